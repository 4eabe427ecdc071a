"""The edge side: the target model, one KV cache per session, and `verify_block` on every request.

`handle_batch` serves many sessions' rounds with ONE target forward pass (`draftwire.shared.models.batched_forward`),
then runs the single-session rejection math on each session's rows; `handle` is a batch of one. Under a token
budget it verifies the best draft prefixes (`draft_selection`), and every verdict reports the load it was
served under (`batch_cost`). `VerifierCore` is I/O-free so the in-process engine and the verifier service run the very same code. Sessions
are bounded by count and by cached tokens (a proxy for KV memory) with LRU eviction; a request for a session
this core does not hold (evicted, restarted, or served by another instance) raises `SessionUnknown`, and the
device answers by resending the token history, from which the cache is rebuilt. A generation therefore never
fails because a cache was lost, and the seeded per-round RNG makes the rebuilt session draw what the lost one
would have.

A verifier must never verify against another generation's cache, so a continuing round is served only when
this core's copy has the request's committed length and `session_digest` (equal length and last token are not
enough: two sessions can share both). Any mismatch drops the copy and asks for the history. Work is bounded
at the edge too: a session's opening request brings its deadline, after which rounds are refused
(`deadline_exceeded`) and the session dropped; a prompt plus `max_new_tokens`, or a round, that would run past
the target's context length is refused (`context_length_exceeded`). Refusals carry the `code` that
`speculation.verify_rounds` puts in the ErrorReply.

A long prefill is chunked (`prefill_chunk`): a pass feeds at most that many uncached history tokens of a
round and answers it `PrefillPending` instead of a verdict, and the caller passes the round in again. The
verifier service's batcher does so at the head of its queue, so other sessions' rounds share the passes in
between (one long prompt no longer stalls every device for its whole prefill), and a session closed or past
its deadline mid-prefill stops within one chunk. The rows are the unchunked ones up to float rounding.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from draftwire.shared.core import session_digest, torch_sampling
from draftwire.shared.core.batch_cost import ForwardCost
from draftwire.shared.core.draft_selection import select_prefixes
from draftwire.shared.core.params import SamplingParams
from draftwire.shared.core.proposal import ProposalBlock, support_row
from draftwire.shared.core.protocol import ProtocolError, Verdict, VerifyRequest
from draftwire.shared.core.rejection_sampling import (
    NonFinite,
    SplitOutcome,
    VerificationError,
    split_verify,
    verify_block,
)
from draftwire.shared.core.rng import VERIFY_SIDE, round_rng
from draftwire.shared.core.warpers import mask_eos, warp
from draftwire.shared.models.batched_forward import next_logits_batch
from draftwire.shared.models.kv_sequence import common_prefix
from draftwire.shared.models.runtime import KVSequence, LoadedModel


@dataclass(frozen=True)
class PrefillPending:
    """Not a verdict yet: this pass fed one chunk of the round's history (`cached` of `total` tokens are in the
    session's KV cache now); pass the same round in again for the next chunk, and then its verdict."""

    session: str
    cached: int
    total: int


class SessionUnknown(LookupError):
    """This verifier holds no usable state for the session: resend the request with its history."""

    code = "unknown_session"


class RoundRefused(RuntimeError):
    """The round cannot be served and resending cannot fix it; the session is dropped. `code` names why."""

    code = "refused"


class DeadlineExceeded(RoundRefused):
    code = "deadline_exceeded"


class ContextLengthExceeded(RoundRefused):
    code = "context_length_exceeded"


@dataclass
class _Session:
    committed: list[int]
    digest: int  # session_digest of `committed`
    prompt_len: int
    params: SamplingParams
    deadline: float  # unix seconds, 0 = none
    seq: KVSequence
    last_used: float = field(default_factory=time.monotonic)


class VerifierCore:
    def __init__(
        self,
        model: LoadedModel,
        max_sessions: int = 64,
        max_cached_tokens: int = 262_144,
        clock: Callable[[], float] = time.time,
        sampling: str = "auto",
        prefill_chunk: int | None = None,
    ) -> None:
        """`clock` is unix time (deadlines are absolute); tests pass their own. `sampling`: where the
        warping and rejection math runs: "torch" (on the model's device), "numpy" (host), "auto" (torch
        unless the model is on the CPU, where numpy is as fast and is the tested oracle). `prefill_chunk`:
        the most uncached history tokens one pass feeds for a round (None: all of them at once)."""
        if sampling not in ("auto", "torch", "numpy"):
            raise ValueError(f"sampling must be auto, torch or numpy; got {sampling!r}")
        if max_sessions < 1 or max_cached_tokens < 1:
            raise ValueError("max_sessions and max_cached_tokens must be >= 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 (or None), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model
        device = getattr(model, "device", None)
        self.torch_sampling = sampling == "torch" or (sampling == "auto" and getattr(device, "type", "cpu") != "cpu")
        self.context_length = int(model.context_length)
        self.max_sessions = max_sessions
        self.max_cached_tokens = max_cached_tokens
        self.clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.evictions = 0
        # load figures: forward passes run, sessions and tokens they carried, and the marginal token cost
        self.forwards = self.batch_rows = self.forward_tokens = 0
        self.prefill_chunks = 0  # rounds answered PrefillPending: chunks of long prefills fed before the last
        self.cost = ForwardCost()

    def __contains__(self, session: str) -> bool:
        return session in self._sessions

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    @property
    def cached_tokens(self) -> int:
        return sum(len(s.seq) for s in self._sessions.values())

    def kv_bytes_per_token(self) -> int:
        """Keys and values of one cached token over all layers: what `max_cached_tokens` bounds, times this."""
        cfg = self.model.model.config.get_text_config()
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        itemsize = next(self.model.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize

    def close(self, session: str) -> None:
        self._sessions.pop(session, None)

    def close_all(self) -> None:
        """Drop every session (a drained verifier hands the ones still cached over)."""
        self._sessions.clear()

    def handle(self, req: VerifyRequest) -> Verdict:
        """Verify one round of a request that passed the codec's checks (so an opening request's digest is
        its history's). Raises SessionUnknown, RoundRefused, ProtocolError or VerificationError (NonFinite
        among them); commits nothing unless it returns a Verdict. A chunked prefill runs all its passes here."""
        while isinstance(result := self.handle_batch([req])[0], PrefillPending):
            pass
        if isinstance(result, Exception):
            raise result
        return result

    def handle_batch(
        self, reqs: Sequence[VerifyRequest], budget: int | None = None
    ) -> list[Verdict | Exception | PrefillPending]:
        """One round of each request, all in ONE target forward pass (see batched_forward); the result of
        request i is its Verdict or the exception `handle` would raise for it alone, or PrefillPending when
        this pass only fed a chunk of its history. One request's refusal never touches another's round.
        Requests must name distinct sessions.

        `budget` caps the verified tokens (each session's one target row plus the draft tokens it keeps); when
        the rounds need more, `draft_selection.select_prefixes` picks the prefixes to verify and each verdict
        says how many it `considered`. Rounds opening a session are not truncated (their prefill dominates).
        """
        if len({r.session for r in reqs}) != len(reqs):
            raise ValueError("one batch may hold one round per session")
        t0 = time.perf_counter()
        results: list[Verdict | Exception | None] = [None] * len(reqs)
        ready: list[tuple[int, _Session]] = []
        for i, req in enumerate(reqs):
            try:
                if req.vocab_size != self.model.vocab_size:
                    raise ProtocolError("bad_field", f"request vocabulary {req.vocab_size} does not match the "
                                                     f"target's {self.model.vocab_size}")
                ready.append((i, self._session_for(req)))
            except (SessionUnknown, RoundRefused, ProtocolError) as exc:
                results[i] = exc
        keep = self._prefixes([reqs[i] for i, _ in ready], budget)
        feeds = [self._feed(sess, reqs[i], k) for (i, sess), k in zip(ready, keep, strict=True)]
        rows = next_logits_batch([sess.seq for _, sess in ready], [f for f, _ in feeds], [n for _, n in feeds])
        forward_s = time.perf_counter() - t0
        tokens = sum(n for _, n in feeds)
        if ready:
            self.forwards += 1
            self.batch_rows += len(ready)
            self.forward_tokens += tokens
            if all(reqs[i].history is None for i, _ in ready):  # a (re)built session's prefill is not a
                self.cost.observe(tokens, forward_s)  # verification cost: it would skew the per-token slope
        load = {"batch": max(len(ready), 1), "token_s": self.cost.per_token()}
        for ((i, sess), k), logits, (fed, _) in zip(zip(ready, keep, strict=True), rows, feeds, strict=True):
            if len(fed) < len(sess.committed):  # one chunk of a long history: no verdict yet
                results[i] = PrefillPending(reqs[i].session, len(fed), len(sess.committed))
                self.prefill_chunks += 1
                continue
            try:
                results[i] = self._judge(sess, reqs[i], k, logits, t0, load)
            except VerificationError as exc:
                results[i] = exc
        self._evict()
        return results  # type: ignore[return-value]

    def _feed(self, sess: _Session, req: VerifyRequest, k: int) -> tuple[list[int], int]:
        """What this pass feeds a round's sequence, and how many logits rows it reads: the history and the
        first `k` draft tokens (k + 1 rows), or, while more than `prefill_chunk` history tokens are not
        cached yet, only the next chunk of them (one row, never read)."""
        if self.prefill_chunk is not None and req.history is not None:  # a continuing round adds a few tokens
            cached = common_prefix(getattr(sess.seq, "tokens", ()), sess.committed)
            if len(sess.committed) - cached > self.prefill_chunk:
                return sess.committed[: cached + self.prefill_chunk], 1
        return sess.committed + [int(t) for t in req.tokens[:k]], k + 1

    def _prefixes(self, reqs: list[VerifyRequest], budget: int | None) -> list[int]:
        """Draft tokens to verify per request: all of them, or the budget's best prefixes (TETRIS). Opening
        rounds keep theirs; every other round keeps at least its one target row."""
        full = [len(r.tokens) for r in reqs]
        going = [i for i, r in enumerate(reqs) if r.history is None]
        if budget is None:
            return full
        spare = budget - sum(full[i] + 1 for i, r in enumerate(reqs) if r.history is not None)
        if spare >= sum(full[i] + 1 for i in going):
            return full
        chosen = select_prefixes([_confidences(reqs[i]) for i in going], max(spare, len(going)))
        for i, k in zip(going, chosen, strict=True):
            full[i] = k
        return full

    def _judge(
        self, sess: _Session, req: VerifyRequest, k: int, logits: torch.Tensor, t0: float, load: dict
    ) -> Verdict:
        """The single-session math on this request's rows: warp, accept tests, residual; then commit. On the
        model's device in torch (`torch_sampling`) or on the host in numpy (the oracle), same draws."""
        math_ = torch_sampling if self.torch_sampling else _numpy_math()
        if not self.torch_sampling:
            logits = logits.cpu().numpy()
        math_.check_logits(logits)  # greedy would turn a NaN row into a confident one-hot
        tokens = [int(t) for t in req.tokens[:k]]
        p = sess.params
        logits = math_.mask_eos(logits, self.model.eos_token_ids, req.base - sess.prompt_len, p.min_new_tokens)
        probs = math_.warp(logits, p.temperature, p.top_p)
        rng = round_rng(p.seed, VERIFY_SIDE, req.base)
        residual = None
        if req.draft_probs is not None:  # DSSD: accept tests here, the correction on the device
            split, residual = math_.split_verify_wire(probs, tokens, req.draft_probs[:k], rng)
            n_accepted, token = split.n_accepted, -1 if split.token is None else split.token
            emitted = tokens[:n_accepted] + ([] if split.token is None else [split.token])
        else:
            outcome = math_.verify_block(probs, tokens, req.proposals, rng)
            n_accepted, token = outcome.n_accepted, outcome.token
            emitted = tokens[:n_accepted] + [token]
        sess.committed.extend(emitted)  # after a DSSD rejection the device's correction arrives next round
        sess.digest = session_digest.extend(sess.digest, emitted)
        sess.last_used = time.monotonic()
        return Verdict(
            session=req.session,
            round=req.round,
            base=req.base,
            n_accepted=n_accepted,
            token=token,
            verify_s=time.perf_counter() - t0,
            residual=residual,
            sent_at=time.time(),
            considered=k if k < len(req.tokens) else None,
            **load,
        )

    def _session_for(self, req: VerifyRequest) -> _Session:
        """The session this round continues, (re)built from the history of an opening request; checks the
        request's length and digest against it, then its deadline and the context length."""
        sess = self._sessions.get(req.session)
        if req.history is not None:
            budget = req.prompt_len + req.params.max_new_tokens
            if budget > self.context_length:
                self._sessions.pop(req.session, None)
                raise ContextLengthExceeded(
                    f"prompt of {req.prompt_len} tokens + max_new_tokens {req.params.max_new_tokens} exceeds the "
                    f"target's context length {self.context_length}"
                )
            history = [int(t) for t in req.history]
            if sess is None:
                sess = _Session(history, req.digest, req.prompt_len, req.params, req.deadline,
                                self.model.new_sequence())
            else:  # keep the KV cache: next_logits reuses whatever prefix still matches
                sess.committed, sess.digest, sess.prompt_len = history, req.digest, req.prompt_len
                sess.params, sess.deadline = req.params, req.deadline
            self._sessions[req.session] = sess
        elif sess is None:
            raise SessionUnknown(f"session {req.session!r} is not held by this verifier; resend with history")
        else:
            if len(sess.committed) == req.base - 1:  # the device committed one token we did not choose
                sess.committed.append(int(req.last_token))
                sess.digest = session_digest.extend(sess.digest, [int(req.last_token)])
            if len(sess.committed) != req.base or sess.digest != req.digest:
                self._sessions.pop(req.session, None)
                raise SessionUnknown(
                    f"session {req.session!r} is out of sync (verifier at {len(sess.committed)} tokens, request "
                    f"at {req.base}, or another generation's tokens); resend with history"
                )
        if sess.deadline and self.clock() > sess.deadline:
            self._sessions.pop(req.session, None)
            raise DeadlineExceeded(f"session {req.session!r} is past its deadline")
        if req.base + req.gamma + 1 > self.context_length:
            self._sessions.pop(req.session, None)
            raise ContextLengthExceeded(
                f"a round of {req.gamma} draft tokens at {req.base} committed runs past the target's context length "
                f"{self.context_length}"
            )
        self._sessions.move_to_end(req.session)
        return sess

    def _evict(self) -> None:
        """Drop least-recently-used sessions beyond the count or cached-token budget (never the newest)."""
        while len(self._sessions) > 1 and (
            len(self._sessions) > self.max_sessions
            or self.cached_tokens > self.max_cached_tokens
        ):
            self._sessions.popitem(last=False)
            self.evictions += 1


def _split_verify_wire(
    probs: np.ndarray, tokens: list[int], draft_probs: np.ndarray, rng: np.random.Generator
) -> tuple[SplitOutcome, ProposalBlock | None]:
    """DSSD's edge half: accept tests on the rows as the wire rounds them, and the rejected row to send."""
    rows = [ProposalBlock.from_rows([support_row(row)], len(row), "f32") for row in probs]
    p_hat = np.stack([row.dense_row(0) for row in rows])  # exactly what the device would receive
    split = split_verify(p_hat, tokens, draft_probs, rng)
    return split, None if split.rejected_row is None else rows[split.rejected_row]


def _check_logits(logits: np.ndarray) -> None:
    """-inf is a legal mask; NaN, +inf, or a row with no finite logit is a broken forward pass."""
    if bool(np.isnan(logits).any() | np.isposinf(logits).any()) or not bool(np.isfinite(logits).any(axis=-1).all()):
        raise NonFinite("the target's logits hold a NaN, a +inf, or a row without a finite value")


def _numpy_math() -> SimpleNamespace:
    """The host (numpy) implementation of the sampling math, under the names torch_sampling gives it; looked
    up at each call, so a test that plants a bug in this module's `verify_block` reaches the verifier."""
    return SimpleNamespace(check_logits=_check_logits, mask_eos=mask_eos, warp=warp, verify_block=verify_block,
                           split_verify_wire=_split_verify_wire)


def _confidences(req: VerifyRequest) -> list[float]:
    """q_i(x_i) of each drafted token: the draft's own estimate that the target will accept it."""
    if req.draft_probs is not None:
        return [float(x) for x in req.draft_probs]
    if req.proposals is None:
        return []
    return [req.proposals.prob_of(i, int(t)) for i, t in enumerate(req.tokens)]

