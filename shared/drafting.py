"""The device side of one generation: draft a block, build the exact sparse proposals, apply verdicts.

`DraftSession` owns the committed token history and the draft model's KV cache. It produces a
`VerifyRequest` per round and consumes the `Verdict`; the in-process engine and the draft service both drive
it, so the bytes they send are the same.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from shared.models.runtime import LoadedModel
from shared.params import SamplingParams, SpecParams
from shared.proposal import ProposalBlock, dequantize, sample_index, sparse_row
from shared.protocol import Verdict, VerifyRequest
from shared.rng import DRAFT_SIDE, round_rng
from shared.warpers import mask_eos, warp


@dataclass
class DraftSession:
    session: str
    model: LoadedModel | None  # None: `ar` mode, the target alone
    prompt_ids: list[int]
    params: SamplingParams
    spec: SpecParams
    eos_ids: tuple[int, ...]
    vocab_size: int
    committed: list[int] = field(default_factory=list)
    round: int = 0
    finish_reason: str | None = None
    verifier_knows_session: bool = False  # False -> the next request carries history + params

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        self.committed = list(self.prompt_ids)
        self._seq = self.model.new_sequence() if self.model is not None else None

    @property
    def generated(self) -> list[int]:
        return self.committed[len(self.prompt_ids) :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def k(self) -> int:
        return self.vocab_size if self.spec.mode == "full" else self.spec.k

    def next_request(self, gamma: int | None = None) -> tuple[VerifyRequest, float]:
        """Draft up to gamma tokens; returns the request and the draft compute time in seconds."""
        t0 = time.perf_counter()
        n_gen = len(self.generated)
        remaining = self.params.max_new_tokens - n_gen
        speculate = self._seq is not None and self.spec.mode != "ar"
        gamma = min(self.spec.gamma if gamma is None else gamma, remaining - 1) if speculate else 0
        rng = round_rng(self.params.seed, DRAFT_SIDE, len(self.committed))
        tokens: list[int] = []
        rows = []
        for i in range(gamma):
            logits = self._seq.next_logits(self.committed + tokens, 1).numpy()
            logits = mask_eos(logits, self.eos_ids, n_gen + i, self.params.min_new_tokens)
            probs = warp(logits, self.params.temperature, self.params.top_p)[0]
            ids, raw = sparse_row(probs, self.k, self.spec.quant)
            slot = sample_index(dequantize(raw), rng.random())
            token = slot if ids is None else int(ids[slot])
            tokens.append(token)
            rows.append((ids, raw))
            if token in self.eos_ids:
                break  # nothing after end-of-sequence can be kept
        reopen = not self.verifier_knows_session
        req = VerifyRequest(
            session=self.session,
            round=self.round,
            base=len(self.committed),
            last_token=self.committed[-1],
            tokens=np.asarray(tokens, dtype=np.int64),
            proposals=ProposalBlock.from_rows(rows, self.vocab_size, self.spec.quant) if tokens else None,
            vocab_size=self.vocab_size,
            history=np.asarray(self.committed, dtype=np.int64) if reopen else None,
            params=self.params if reopen else None,
            prompt_len=len(self.prompt_ids) if reopen else None,
            sent_at=time.time(),
        )
        return req, time.perf_counter() - t0

    def reopen(self, req: VerifyRequest) -> VerifyRequest:
        """The same round again, carrying what a verifier needs to (re)build the session from scratch."""
        self.verifier_knows_session = False
        return dataclasses.replace(
            req,
            history=np.asarray(self.committed, dtype=np.int64),
            params=self.params,
            prompt_len=len(self.prompt_ids),
        )

    def apply(self, req: VerifyRequest, verdict: Verdict) -> list[int]:
        """Commit the accepted prefix and the target's token; returns the newly committed tokens."""
        if verdict.session != self.session or verdict.base != req.base or verdict.round != req.round:
            raise ValueError(
                f"verdict for {verdict.session}/{verdict.round}@{verdict.base} does not answer "
                f"request {req.session}/{req.round}@{req.base}"
            )
        if not 0 <= verdict.n_accepted <= len(req.tokens):
            raise ValueError(f"verdict accepts {verdict.n_accepted} of {len(req.tokens)} draft tokens")
        self.verifier_knows_session = True
        self.round += 1
        new: list[int] = []
        for token in [int(t) for t in req.tokens[: verdict.n_accepted]] + [int(verdict.token)]:
            self.committed.append(token)
            new.append(token)
            if token in self.eos_ids:
                self.finish_reason = "stop"
                break
            if len(self.generated) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                break
        return new
