"""The edge side: the target model, one KV cache per session, and `verify_block` on every request.

`VerifierCore` is I/O-free so the in-process engine and the verifier service run the very same code. Sessions
are bounded by count and by cached tokens (a proxy for KV memory) with LRU eviction; a request for a session
this core does not hold (evicted, restarted, or served by another instance) raises `SessionUnknown`, and the
device answers by resending the token history, from which the cache is rebuilt. A generation therefore never
fails because a cache was lost, and the seeded per-round RNG makes the rebuilt session draw what the lost one
would have.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from shared.core.params import SamplingParams
from shared.core.proposal import ProposalBlock, support_row
from shared.core.protocol import ProtocolError, Verdict, VerifyRequest
from shared.core.rejection_sampling import split_verify, verify_block
from shared.core.rng import VERIFY_SIDE, round_rng
from shared.core.warpers import mask_eos, warp
from shared.models.runtime import KVSequence, LoadedModel


class SessionUnknown(LookupError):
    """This verifier holds no usable state for the session: resend the request with its history."""

    code = "unknown_session"


@dataclass
class _Session:
    committed: list[int]
    prompt_len: int
    params: SamplingParams
    seq: KVSequence
    last_used: float = field(default_factory=time.monotonic)


class VerifierCore:
    def __init__(self, model: LoadedModel, max_sessions: int = 64, max_cached_tokens: int = 262_144) -> None:
        if max_sessions < 1 or max_cached_tokens < 1:
            raise ValueError("max_sessions and max_cached_tokens must be >= 1")
        self.model = model
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.evictions = 0

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def close(self, session: str) -> None:
        self._sessions.pop(session, None)

    def handle(self, req: VerifyRequest) -> Verdict:
        """Verify one round. Raises SessionUnknown, ProtocolError or VerificationError; never half-commits."""
        t0 = time.perf_counter()
        if req.vocab_size != self.model.vocab_size:
            raise ProtocolError(
                "bad_field", f"request vocabulary {req.vocab_size} does not match the target's {self.model.vocab_size}"
            )
        sess = self._session_for(req)
        tokens = [int(t) for t in req.tokens]
        logits = sess.seq.next_logits(sess.committed + tokens, len(tokens) + 1).numpy()
        p = sess.params
        logits = mask_eos(logits, self.model.eos_token_ids, req.base - sess.prompt_len, p.min_new_tokens)
        probs = warp(logits, p.temperature, p.top_p)
        rng = round_rng(p.seed, VERIFY_SIDE, req.base)
        residual = None
        if req.draft_probs is not None:  # DSSD: accept tests here, the correction on the device
            rows = [ProposalBlock.from_rows([support_row(row)], self.model.vocab_size, "f32") for row in probs]
            p_hat = np.stack([row.dense_row(0) for row in rows])  # exactly what the device would receive
            split = split_verify(p_hat, tokens, req.draft_probs, rng)
            n_accepted, token = split.n_accepted, -1 if split.token is None else split.token
            if split.rejected_row is not None:
                residual = rows[split.rejected_row]
            emitted = tokens[:n_accepted] + ([] if split.token is None else [split.token])
        else:
            outcome = verify_block(probs, tokens, req.proposals, rng)
            n_accepted, token = outcome.n_accepted, outcome.token
            emitted = tokens[:n_accepted] + [token]
        sess.committed.extend(emitted)  # after a DSSD rejection the device's correction arrives next round
        sess.last_used = time.monotonic()
        self._evict()
        return Verdict(
            session=req.session,
            round=req.round,
            base=req.base,
            n_accepted=n_accepted,
            token=token,
            verify_s=time.perf_counter() - t0,
            residual=residual,
            sent_at=time.time(),
        )

    def _session_for(self, req: VerifyRequest) -> _Session:
        sess = self._sessions.get(req.session)
        if req.history is not None:
            history = [int(t) for t in req.history]
            if sess is None:
                sess = _Session(history, req.prompt_len, req.params, self.model.new_sequence())
            else:  # keep the KV cache: next_logits reuses whatever prefix still matches
                sess.committed, sess.prompt_len, sess.params = history, req.prompt_len, req.params
            self._sessions[req.session] = sess
        elif sess is None:
            raise SessionUnknown(f"session {req.session!r} is not held by this verifier; resend with history")
        elif len(sess.committed) == req.base - 1:  # the device committed one token we did not choose
            sess.committed.append(int(req.last_token))
        elif len(sess.committed) != req.base or sess.committed[-1] != req.last_token:
            self._sessions.pop(req.session, None)
            raise SessionUnknown(
                f"session {req.session!r} is out of sync (verifier at {len(sess.committed)} tokens, "
                f"request at {req.base}); resend with history"
            )
        self._sessions.move_to_end(req.session)
        return sess

    def _evict(self) -> None:
        """Drop least-recently-used sessions beyond the count or cached-token budget (never the newest)."""
        while len(self._sessions) > 1 and (
            len(self._sessions) > self.max_sessions
            or sum(len(s.seq) for s in self._sessions.values()) > self.max_cached_tokens
        ):
            self._sessions.popitem(last=False)
            self.evictions += 1

