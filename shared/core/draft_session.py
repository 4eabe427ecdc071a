"""The device side of one generation: draft a block, build the exact sparse proposals, apply verdicts.

`DraftSession` owns the committed token history and the draft model's KV cache. It produces a
`VerifyRequest` per round and consumes the `Verdict`; the in-process engine and the draft service both drive
it, so the bytes they send are the same. It keeps the `session_digest` of what it committed, so every request
proves to the verifier which generation it continues, and it carries the generation's deadline to every
verifier that opens the session. A verdict is untrusted input: one that does not answer the request, or names
a token outside the vocabulary, is `BadVerdict` rather than a corrupted history. `eos_ids` are the target's:
losslessness is with respect to the target, whose distribution includes when to stop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.core import session_digest
from shared.core.params import SamplingParams, SpecParams
from shared.core.proposal import ProposalBlock, dequantize, sample_index, sparse_row
from shared.core.protocol import Verdict, VerifyRequest
from shared.core.rejection_sampling import correction
from shared.core.rng import CORRECTION_SIDE, DRAFT_SIDE, round_rng
from shared.core.warpers import mask_eos, warp
from shared.models.runtime import LoadedModel


class BadVerdict(ValueError):
    """The verifier's answer cannot be applied to the request it answers (wrong round, token out of range)."""

    code = "bad_verdict"


@dataclass
class Prefetch:
    """Tokens drafted ahead while a round was in flight (see DraftSession.predraft)."""

    base: int  # the committed length they continue from (-1: nothing usable)
    tokens: list[int]
    rows: list
    guess: int | None = None  # the draft's guess of the in-flight round's target token
    stopped: bool = False  # the confidence stop ended it: do not draft on after these

    def matches(self, committed: list[int]) -> bool:
        """Usable iff the round accepted everything and the target's token is the guess."""
        return self.guess is not None and len(committed) == self.base and committed[-1] == self.guess


def _top_prob(logits: np.ndarray) -> float:
    """The draft's own confidence: its softmax maximum at temperature 1 (meaningful under greedy too)."""
    finite = logits[np.isfinite(logits)]
    return float(1.0 / np.exp(finite - finite.max()).sum()) if finite.size else 0.0


@dataclass
class DraftSession:
    session: str
    model: LoadedModel | None  # None: `ar` mode, the target alone
    prompt_ids: list[int]
    params: SamplingParams
    spec: SpecParams
    eos_ids: tuple[int, ...]  # the target's
    vocab_size: int
    deadline: float = 0.0  # unix seconds, 0 = none; sent to every verifier that opens the session
    committed: list[int] = field(default_factory=list)
    round: int = 0
    finish_reason: str | None = None
    verifier_knows_session: bool = False  # False -> the next request carries history + params
    digest: int = field(default=session_digest.EMPTY, init=False)  # of `committed`, kept as it grows

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        self.committed = list(self.prompt_ids)
        self.digest = session_digest.of(self.committed)
        self._seq = self.model.new_sequence() if self.model is not None else None
        self._rows: dict[int, list] = {}  # DSSD: round -> the proposal rows, for the device-side correction

    @property
    def generated(self) -> list[int]:
        return self.committed[len(self.prompt_ids) :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def k(self) -> int:
        return self.vocab_size if self.spec.mode in ("full", "dssd") else self.spec.k

    def next_request(self, gamma: int | None = None, prefetch: Prefetch | None = None) -> tuple[VerifyRequest, float]:
        """Draft up to gamma tokens; returns the request and the draft compute time in seconds.

        `prefetch` (pipelining) holds tokens already drafted from exactly this context: they are used first.
        """
        t0 = time.perf_counter()
        remaining = self.params.max_new_tokens - len(self.generated)
        speculate = self._seq is not None and self.spec.mode != "ar"
        gamma = max(min(self.spec.gamma if gamma is None else gamma, remaining - 1), 0) if speculate else 0
        tokens: list[int] = []
        rows: list = []
        if prefetch is not None and prefetch.base == len(self.committed):
            tokens, rows = prefetch.tokens[:gamma], prefetch.rows[:gamma]
        if len(tokens) < gamma and not (tokens and (tokens[-1] in self.eos_ids or prefetch.stopped)):
            more, more_rows, _ = self._draft(tokens, gamma - len(tokens))
            tokens, rows = tokens + more, rows + more_rows
        reopen = not self.verifier_knows_session
        block = ProposalBlock.from_rows(rows, self.vocab_size, self.spec.quant) if tokens else None
        split = self.spec.mode == "dssd" and block is not None
        if split:  # uplink: tokens and q_i(x_i) only; q itself stays here for the correction
            self._rows[self.round] = rows
            draft_probs = np.array([block.prob_of(i, t) for i, t in enumerate(tokens)], dtype=np.float64)
        req = VerifyRequest(
            session=self.session,
            round=self.round,
            base=len(self.committed),
            last_token=self.committed[-1],
            tokens=np.asarray(tokens, dtype=np.int64),
            proposals=None if split else block,
            draft_probs=draft_probs if split else None,
            vocab_size=self.vocab_size,
            history=np.asarray(self.committed, dtype=np.int64) if reopen else None,
            params=self.params if reopen else None,
            prompt_len=len(self.prompt_ids) if reopen else None,
            sent_at=time.time(),
            digest=self.digest,
            deadline=self.deadline if reopen else 0.0,
        )
        return req, time.perf_counter() - t0

    def predraft(self, req: VerifyRequest, n: int, cancelled: Callable[[], bool] = lambda: False) -> Prefetch:
        """PEARL: while `req` is being verified, draft on as if all of it will be accepted.

        The first pre-drafted token is the draft's guess of the target's bonus token; the rest are the next
        round's draft, valid only if the verdict accepts all of `req` and its token equals that guess. Every
        position draws its own seeded uniform, so a kept prefetch is bit-identical to drafting afresh after the
        verdict: pipelining changes timing, never tokens. Stops early once `cancelled()` (the verdict arrived).
        """
        remaining = self.params.max_new_tokens - len(self.generated) - len(req.tokens) - 1
        tokens = [int(t) for t in req.tokens]
        if self._seq is None or (tokens and tokens[-1] in self.eos_ids) or remaining < 1:
            return Prefetch(base=-1, tokens=[], rows=[])
        guess, rows, stopped = self._draft(tokens, n + 1, cancelled)
        return Prefetch(
            base=req.base + len(tokens) + 1, tokens=guess[1:], rows=rows[1:], guess=guess[0] if guess else None,
            stopped=stopped,
        )

    def _draft(
        self, prefix: list[int], n: int, cancelled: Callable[[], bool] = lambda: False
    ) -> tuple[list[int], list, bool]:
        """Sample up to n draft tokens after committed + prefix; returns (tokens, wire rows, stopped early).

        Position t draws its uniform from round_rng(seed, DRAFT_SIDE, t), independent of round boundaries.
        The confidence policy stops before a token whose draft top probability is below the threshold.
        """
        tokens: list[int] = []
        rows = []
        n_gen = len(self.generated) + len(prefix)
        for i in range(n):
            if cancelled():
                return tokens, rows, False
            context = self.committed + prefix + tokens
            logits = self._seq.next_logits(context, 1).numpy()
            logits = mask_eos(logits, self.eos_ids, n_gen + i, self.params.min_new_tokens)
            if self.spec.policy == "confidence" and (prefix or tokens) and _top_prob(logits[0]) < self.spec.confidence:
                return tokens, rows, True
            probs = warp(logits, self.params.temperature, self.params.top_p)[0]
            ids, raw = sparse_row(probs, self.k, self.spec.quant)
            u = round_rng(self.params.seed, DRAFT_SIDE, len(context)).random()
            slot = sample_index(dequantize(raw), u)
            token = slot if ids is None else int(ids[slot])
            tokens.append(token)
            rows.append((ids, raw))
            if token in self.eos_ids:
                break  # nothing after end-of-sequence can be kept
        return tokens, rows, False

    def reopen(self, req: VerifyRequest) -> VerifyRequest:
        """The same round again, carrying what a verifier needs to (re)build the session from scratch."""
        self.verifier_knows_session = False
        return dataclasses.replace(
            req,
            history=np.asarray(self.committed, dtype=np.int64),
            params=self.params,
            prompt_len=len(self.prompt_ids),
            deadline=self.deadline,
        )

    def apply(self, req: VerifyRequest, verdict: Verdict) -> list[int]:
        """Commit the accepted prefix and the target's token; returns the newly committed tokens.

        Raises BadVerdict, committing nothing, when the verdict cannot be this round's answer."""
        if verdict.session != self.session or verdict.base != req.base or verdict.round != req.round:
            raise BadVerdict(
                f"verdict for {verdict.session}/{verdict.round}@{verdict.base} does not answer "
                f"request {req.session}/{req.round}@{req.base}"
            )
        if not 0 <= verdict.n_accepted <= len(req.tokens):
            raise BadVerdict(f"verdict accepts {verdict.n_accepted} of {len(req.tokens)} draft tokens")
        rows = self._rows.get(req.round)
        extra = int(verdict.token)
        if verdict.residual is None:
            if not 0 <= extra < self.vocab_size:
                raise BadVerdict(f"verdict token {extra} is outside the vocabulary [0, {self.vocab_size})")
        else:  # DSSD rejection: the edge sent p_j, the correction is drawn here
            j = verdict.n_accepted
            if rows is None or j >= len(req.tokens) or verdict.residual.vocab_size != self.vocab_size:
                raise BadVerdict(f"verdict carries a target row for position {j} that this round did not draft")
            if not -1 <= extra < self.vocab_size:
                raise BadVerdict(f"verdict token {extra} is neither -1 nor in the vocabulary [0, {self.vocab_size})")
        self.verifier_knows_session = True
        self.round += 1
        self._rows.pop(req.round, None)
        if verdict.residual is not None:
            j = verdict.n_accepted
            q_j = ProposalBlock.from_rows([rows[j]], self.vocab_size, self.spec.quant).dense_row(0)
            u = round_rng(self.params.seed, CORRECTION_SIDE, req.base).random()
            extra = correction(verdict.residual.dense_row(0), q_j, u)
        new: list[int] = []
        for token in [int(t) for t in req.tokens[: verdict.n_accepted]] + [extra]:
            self.committed.append(token)
            new.append(token)
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
            if len(self.generated) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                break
        self.digest = session_digest.extend(self.digest, new)
        return new
