"""Rejection sampling against the draft's exact proposal: the one verification implementation.

Given target probabilities p at gamma+1 positions and the gamma proposals q the device sampled from, accept
draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a sample from
norm(max(0, p_i - q_i)); if every draft token is accepted emit a bonus sample from p_{gamma+1}. The emitted
tokens are then distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023). The in-process engine
and the verifier service both call `verify_block`; nothing else decides acceptance.

It is also where numerics are checked, because a NaN accepts silently: min(1, nan / q) is 1 and `rng.random()
>= nan` is False. A target row that is not a finite distribution, or a draft probability outside (0, 1], is
`NonFinite` (error code `non_finite`), never an acceptance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from draftwire.shared.core.proposal import ProposalBlock, sample_index


class VerificationError(ValueError):
    """The proposal cannot have produced the draft token (q(x) == 0): the sender is broken or lying."""

    code = "bad_proposal"


class NonFinite(VerificationError):
    """A probability is NaN, infinite or out of range (a broken model, or a broken sender): no verdict."""

    code = "non_finite"


@dataclass(frozen=True)
class Outcome:
    """How many draft tokens survived and the one token the target adds (correction or bonus)."""

    n_accepted: int
    token: int
    corrected: bool = False  # True: `token` replaces a rejected draft token; False: bonus after full acceptance


def acceptance_probability(p_x: float, q_x: float) -> float:
    """min(1, p(x)/q(x)): how likely the target keeps a token the draft proposed with probability q(x)."""
    return min(1.0, p_x / q_x)


def residual(p: np.ndarray, q_dense: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where the target has more mass than the draft, the only place a correction may land.

    When p <= q everywhere (numerically p == q) a rejection has probability 0; p itself is returned then so a
    rounding-level rejection still emits a token from the target distribution.
    """
    r = np.maximum(p - q_dense, 0.0)
    total = r.sum()
    return r / total if total > 0 else p


def count_accepted(
    target_probs: np.ndarray, draft_tokens: Sequence[int], draft_token_probs: Sequence[float], rng: np.random.Generator
) -> int:
    """The accept tests in order: how many draft tokens survive (one uniform drawn per test, stopping at the
    first rejection). Needs only q(x_i) of each drafted token, which is why DSSD can send just that uplink."""
    for i, (x, q_x) in enumerate(zip(draft_tokens, draft_token_probs, strict=True)):
        q_x, p_x = float(q_x), float(target_probs[i, x])
        if not (math.isfinite(q_x) and q_x <= 1.0):
            raise NonFinite(f"draft token {int(x)} at position {i} has proposal probability {q_x!r}")
        if not q_x > 0.0:
            raise VerificationError(f"draft token {int(x)} at position {i} has zero probability in its proposal")
        if not 0.0 <= p_x < math.inf:  # also False for NaN
            raise NonFinite(f"target probability {p_x!r} of draft token {int(x)} at position {i}")
        if rng.random() >= acceptance_probability(p_x, q_x):
            return i
    return len(draft_tokens)


def correction(p: np.ndarray, q_dense: np.ndarray, u: float) -> int:
    """The token that replaces a rejected draft: a sample of norm(max(0, p - q)) with the uniform u."""
    return sample_index(residual(p, q_dense), u)


def check_target_probs(target_probs: np.ndarray) -> None:
    """Every row a distribution: finite, non-negative, some mass. Raises NonFinite (a NaN logit, an overflow)."""
    if not bool(np.isfinite(target_probs).all()):
        raise NonFinite("the target's probabilities hold a NaN or an infinity")
    if bool((target_probs < 0).any()) or not bool((target_probs.sum(axis=-1) > 0).all()):
        raise NonFinite("a target row is negative somewhere or has no mass")


def _check_rows(target_probs: np.ndarray, gamma: int) -> None:
    if target_probs.shape[0] != gamma + 1:
        raise ValueError(f"need {gamma + 1} target rows for {gamma} draft tokens, got {target_probs.shape[0]}")
    check_target_probs(target_probs)


def verify_block(
    target_probs: np.ndarray,
    draft_tokens: Sequence[int],
    proposals: ProposalBlock,
    rng: np.random.Generator,
) -> Outcome:
    """Accept the longest prefix of `draft_tokens` and emit one more token; see the module docstring.

    `target_probs` is [gamma+1, V] float64 (already warped); row i scores draft token i, the last row the bonus.
    """
    gamma = len(draft_tokens)
    _check_rows(target_probs, gamma)
    q_x = [proposals.prob_of(i, int(x)) for i, x in enumerate(draft_tokens)]
    n = count_accepted(target_probs, draft_tokens, q_x, rng)
    if n < gamma:
        return Outcome(n, correction(target_probs[n], proposals.dense_row(n), rng.random()), corrected=True)
    return Outcome(gamma, sample_index(target_probs[gamma], rng.random()))


@dataclass(frozen=True)
class SplitOutcome:
    """DSSD's edge half: accepted count, and either the bonus token or the target row p_j of the rejection."""

    n_accepted: int
    token: int | None  # the bonus after full acceptance; None after a rejection
    rejected_row: int | None  # j, the row of target_probs the device needs for its correction


def split_verify(
    target_probs: np.ndarray, draft_tokens: Sequence[int], draft_token_probs: Sequence[float], rng: np.random.Generator
) -> SplitOutcome:
    """DSSD at the edge: the same accept tests as `verify_block`, knowing only q_i(x_i) of each draft token.

    At a rejection at j the edge cannot form max(0, p_j - q_j) (it never saw q_j), so it returns j and the
    caller sends p_j downlink; the device draws the correction with `correction(p_j, q_j, u)`. That is exactly
    the residual `verify_block` would sample, so the output is distributed as p. The p_j that crosses the
    wire must be the very p_j the accept tests used: callers pass rows already rounded to their wire form.
    """
    gamma = len(draft_tokens)
    _check_rows(target_probs, gamma)
    n = count_accepted(target_probs, draft_tokens, draft_token_probs, rng)
    if n < gamma:
        return SplitOutcome(n, None, n)
    return SplitOutcome(gamma, sample_index(target_probs[gamma], rng.random()), None)
