"""The verifier's sampling math in torch, on the model's device: warping, rejection and residual sampling.

A batched target on a GPU would otherwise copy every round's [n, vocab] float64 rows to the host for the numpy
code. These functions mirror that code one for one (`warpers`, `rejection_sampling`, `proposal.sample_index`,
`ProposalBlock.dense_row`), which stays the oracle and the device's own implementation: same float64
probabilities, same checks and errors, same Outcome / SplitOutcome, and the uniforms from the same numpy
Generator in the same order. Only scalars come to the host (p(x_i) of the drafted tokens, a sampled index,
the checks' verdicts), except DSSD's rejected row, which crosses the wire anyway.

Bit-identical floats are not possible across libraries: torch's exp and its sum/cumsum reduction orders (a
parallel scan on a GPU) differ from numpy's in the last bits, so probabilities agree to ~1e-15 relative, not
exactly. An Outcome can differ only when a uniform lands within that distance of a decision boundary (an
accept ratio, a CDF step, the top-p cut), about 1e-15 per draw; tests/test_torch_sampling.py checks the
Outcomes are identical on many random rounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from draftwire.shared.core.proposal import ProposalBlock
from draftwire.shared.core.rejection_sampling import (
    NonFinite,
    Outcome,
    SplitOutcome,
    VerificationError,
    acceptance_probability,
)


def check_logits(logits: torch.Tensor) -> None:
    """-inf is a legal mask; NaN, +inf, or a row with no finite logit is a broken forward pass (one sync)."""
    bad = torch.isnan(logits).any() | torch.isposinf(logits).any() | ~torch.isfinite(logits).any(dim=-1).all()
    if bool(bad):
        raise NonFinite("the target's logits hold a NaN, a +inf, or a row without a finite value")


def mask_eos(logits: torch.Tensor, eos_ids: Sequence[int], generated: int, min_new_tokens: int) -> torch.Tensor:
    """`warpers.mask_eos`: end-of-sequence is impossible in the first rows until `min_new_tokens` exist."""
    n_masked = min(max(min_new_tokens - generated, 0), logits.shape[0])
    if n_masked == 0 or not eos_ids:
        return logits
    out = logits.clone()
    out[:n_masked, list(eos_ids)] = -math.inf
    return out


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """`warpers.warp`: [n, V] logits -> [n, V] float64 probabilities on the logits' device; 0 is greedy."""
    logits = logits.to(torch.float64)
    if logits.ndim == 1:
        return warp(logits[None], temperature, top_p)[0]
    if temperature == 0:
        probs = torch.zeros_like(logits)
        probs.scatter_(-1, torch.argmax(logits, dim=-1, keepdim=True), 1.0)  # first maximum, as np.argmax
        return probs
    z = logits / temperature
    z = z - z.amax(dim=-1, keepdim=True)
    probs = torch.exp(z)
    probs /= probs.sum(dim=-1, keepdim=True)
    if top_p < 1.0:
        probs = _top_p(probs, top_p)
    return probs


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`warpers._top_p`; a stable descending sort keeps ties in token order, as numpy's stable argsort."""
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, mass_before < top_p)
    out = torch.where(keep, probs, 0.0)
    return out / out.sum(dim=-1, keepdim=True)


def sample_index(probs: torch.Tensor, u: float) -> int:
    """`proposal.sample_index` on a [V] row: inverse CDF with the caller's uniform; one index to the host."""
    cdf = torch.cumsum(probs, dim=0)
    i = int(torch.searchsorted(cdf, cdf[-1:] * u, right=True))
    if i < probs.shape[0]:
        return i
    # u * total rounded up to total: the last slot that has mass
    return int(probs.shape[0] - 1 - torch.argmax((probs.flip(0) != 0).to(torch.uint8)))


def dense_row(block: ProposalBlock, i: int, device: torch.device | str) -> torch.Tensor:
    """`ProposalBlock.dense_row` on `device`: q_i dequantized on the host exactly as the oracle does, then
    scattered there (a sparse row uploads only its K entries)."""
    ids, q = block.row(i)
    q_t = torch.from_numpy(q).to(device)
    if block.dense:
        return q_t
    out = torch.zeros(block.vocab_size, dtype=torch.float64, device=device)
    out[torch.from_numpy(ids).to(device)] = q_t
    return out


def residual(p: torch.Tensor, q_dense: torch.Tensor) -> torch.Tensor:
    """`rejection_sampling.residual`: norm(max(0, p - q)), or p itself where p <= q everywhere."""
    r = torch.clamp(p - q_dense, min=0.0)
    total = r.sum()
    return torch.where(total > 0, r / total, p)


def correction(p: torch.Tensor, q_dense: torch.Tensor, u: float) -> int:
    """`rejection_sampling.correction`: the token that replaces a rejected draft token."""
    return sample_index(residual(p, q_dense), u)


def check_target_probs(target_probs: torch.Tensor) -> None:
    """`rejection_sampling.check_target_probs`, both verdicts in one transfer."""
    finite, distribution = torch.stack([
        torch.isfinite(target_probs).all(),
        (target_probs >= 0).all() & (target_probs.sum(dim=-1) > 0).all(),
    ]).tolist()
    if not finite:
        raise NonFinite("the target's probabilities hold a NaN or an infinity")
    if not distribution:
        raise NonFinite("a target row is negative somewhere or has no mass")


def _check_rows(target_probs: torch.Tensor, gamma: int) -> None:
    if target_probs.shape[0] != gamma + 1:
        raise ValueError(f"need {gamma + 1} target rows for {gamma} draft tokens, got {target_probs.shape[0]}")
    check_target_probs(target_probs)


def _probs_of(target_probs: torch.Tensor, draft_tokens: Sequence[int]) -> list[float | None]:
    """p_i(x_i) of every drafted token in one transfer; None for an id outside the vocabulary (numpy's
    IndexError, raised where the oracle would read it)."""
    vocab = target_probs.shape[-1]
    ids = [int(x) for x in draft_tokens]
    if not ids:
        return []
    rows = torch.arange(len(ids), device=target_probs.device)
    cols = torch.tensor([x if 0 <= x < vocab else 0 for x in ids], device=target_probs.device)
    values = target_probs[rows, cols].tolist()
    return [v if 0 <= x < vocab else None for x, v in zip(ids, values, strict=True)]


def count_accepted(
    target_probs: torch.Tensor,
    draft_tokens: Sequence[int],
    draft_token_probs: Sequence[float],
    rng: np.random.Generator,
) -> int:
    """`rejection_sampling.count_accepted`: the same checks, messages and uniforms, on gathered p(x_i)."""
    picked = _probs_of(target_probs, draft_tokens)
    for i, (x, q_x) in enumerate(zip(draft_tokens, draft_token_probs, strict=True)):
        q_x, p_x = float(q_x), picked[i]
        if not (math.isfinite(q_x) and q_x <= 1.0):
            raise NonFinite(f"draft token {int(x)} at position {i} has proposal probability {q_x!r}")
        if not q_x > 0.0:
            raise VerificationError(f"draft token {int(x)} at position {i} has zero probability in its proposal")
        if p_x is None:  # numpy's own words
            raise IndexError(f"index {int(x)} is out of bounds for axis 1 with size {target_probs.shape[-1]}")
        if not 0.0 <= p_x < math.inf:  # also False for NaN
            raise NonFinite(f"target probability {p_x!r} of draft token {int(x)} at position {i}")
        if rng.random() >= acceptance_probability(p_x, q_x):
            return i
    return len(draft_tokens)


def verify_block(
    target_probs: torch.Tensor,
    draft_tokens: Sequence[int],
    proposals: ProposalBlock,
    rng: np.random.Generator,
) -> Outcome:
    """`rejection_sampling.verify_block` with `target_probs` a warped [gamma+1, V] float64 tensor."""
    gamma = len(draft_tokens)
    _check_rows(target_probs, gamma)
    q_x = [proposals.prob_of(i, int(x)) for i, x in enumerate(draft_tokens)]
    n = count_accepted(target_probs, draft_tokens, q_x, rng)
    if n < gamma:
        q_dense = dense_row(proposals, n, target_probs.device)
        return Outcome(n, correction(target_probs[n], q_dense, rng.random()), corrected=True)
    return Outcome(gamma, sample_index(target_probs[gamma], rng.random()))


def split_verify(
    target_probs: torch.Tensor,
    draft_tokens: Sequence[int],
    draft_token_probs: Sequence[float],
    rng: np.random.Generator,
) -> SplitOutcome:
    """`rejection_sampling.split_verify`: pass rows already in their wire form (see `wire_rows`)."""
    gamma = len(draft_tokens)
    _check_rows(target_probs, gamma)
    n = count_accepted(target_probs, draft_tokens, draft_token_probs, rng)
    if n < gamma:
        return SplitOutcome(n, None, n)
    return SplitOutcome(gamma, sample_index(target_probs[gamma], rng.random()), None)


def wire_rows(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DSSD's downlink rounding of every row, as `proposal.support_row` + `ProposalBlock.dense_row` do it.

    Returns (raw, p_hat): raw [n, V] float32 is each row normalised and rounded to float32 (what the wire
    carries), p_hat [n, V] float64 is raw renormalised, the row the device will rebuild and so the one the
    accept tests must use.
    """
    raw = (probs / probs.sum(dim=-1, keepdim=True)).to(torch.float32)
    p_hat = raw.to(torch.float64)
    return raw, p_hat / p_hat.sum(dim=-1, keepdim=True)


def support_block(raw_row: torch.Tensor, probs_row: torch.Tensor) -> ProposalBlock:
    """The rejected row for the downlink (one [V] row to the host): `support_row`'s choice of sparse or dense
    from the support of `probs_row`, the float32 values of `raw_row` (a row of `wire_rows`)."""
    vocab = raw_row.shape[-1]
    n_support = int((probs_row > 0).sum())
    raw = raw_row.cpu().numpy()
    if 2 * n_support >= vocab:  # an id costs as much as a value: dense is smaller
        return ProposalBlock.from_rows([(None, raw)], vocab, "f32")
    support = np.flatnonzero(raw > 0).astype(np.int64)  # p > 0 and nonzero in float32, as support_row keeps
    return ProposalBlock.from_rows([(support, raw[support])], vocab, "f32")


def split_verify_wire(
    probs: torch.Tensor,
    draft_tokens: Sequence[int],
    draft_token_probs: Sequence[float],
    rng: np.random.Generator,
) -> tuple[SplitOutcome, ProposalBlock | None]:
    """DSSD's edge half from warped rows: accept tests on the wire-rounded rows, and the rejected row as the
    block to send (None after full acceptance). The verifier's numpy path does the same in three steps."""
    raw, p_hat = wire_rows(probs)
    split = split_verify(p_hat, draft_tokens, draft_token_probs, rng)
    if split.rejected_row is None:
        return split, None
    j = split.rejected_row
    return split, support_block(raw[j], probs[j])
