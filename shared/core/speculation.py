"""The speculation loop, shared by the in-process engine and the draft service.

`speculate` drives one `DraftSession`: draft a block, encode it, hand the bytes to an `EdgeTransport`, decode
the verdict, commit. The transport is the only thing that differs between deployments: `InProcessEdge` calls a
`VerifierCore` in this process (encode and decode still happen, so byte counts are real and the codec runs on
every token); the draft service's `NatsEdge` sends the same bytes over NATS. A verifier that lost the session
answers `unknown_session` and the loop resends the round with the token history, from which the edge rebuilds
its cache, so no transport-specific code decides anything about speculation. Every other refusal (a deadline,
the context length, a bad proposal, non-finite numbers) is final: `RemoteError` with the verifier's code, never
a retry. The caller stops a generation between rounds with `should_stop` (cancel, deadline) and frees the
verifier's copy with `CloseSession` (`handle_close` on the edge).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import trace

from draftwire.shared.core.backoff import Backoff
from draftwire.shared.core.cross_vocab import CrossVocab, cross_for, model_vocabulary
from draftwire.shared.core.draft_length_policy import DraftLengthPolicy, RoundObservation, make_policy
from draftwire.shared.core.draft_session import BadVerdict, DraftSession, Prefetch
from draftwire.shared.core.link_profile import LinkProfile
from draftwire.shared.core.params import ParamError, SamplingParams, SpecParams
from draftwire.shared.core.protocol import (
    CloseSession,
    ErrorReply,
    ProtocolError,
    Verdict,
    VerifyRequest,
    brief,
    decode_any,
)
from draftwire.shared.core.rejection_sampling import VerificationError
from draftwire.shared.core.round_stats import GenerationStats, RoundStats
from draftwire.shared.core.stop_strings import find_stop
from draftwire.shared.core.verifier_sessions import PrefillPending, RoundRefused, SessionUnknown, VerifierCore
from draftwire.shared.models.runtime import LoadedModel

MAX_RESYNCS_PER_ROUND = 3


class RemoteError(RuntimeError):
    """The verifier refused a round for a reason resending cannot fix (bad proposal, protocol error, ...), or
    answered with something that cannot be its answer (`bad_verdict`, `bad_reply`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class EdgeTransport(Protocol):
    """Carries one round's encoded request to a verifier and returns the encoded reply."""

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes: ...


Compute = Callable[[Callable[[], object]], Awaitable[object]]
RoundHook = Callable[[RoundStats, list[int]], Awaitable[None]]
StopCheck = Callable[[], str | None]


async def _inline(fn):
    return fn()


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.summary(),
            "rounds": [r.to_dict() for r in self.stats.rounds],
        }


async def speculate(
    session: DraftSession,
    link: EdgeTransport,
    *,
    decode: Callable[[list[int]], str],
    compute: Compute = _inline,
    on_round: RoundHook | None = None,
    tracer: trace.Tracer | None = None,
    policy: DraftLengthPolicy | None = None,
    should_stop: StopCheck | None = None,
    stop: Sequence[str] = (),
    open_early: bool = False,
) -> GenerationResult:
    """Run `session` to completion. `compute` runs model work (a thread in services); `on_round` streams.

    The draft-length `policy` (default: the one `session.spec` names) picks each round's gamma and learns from
    its outcome. With `spec.pipeline` the device drafts ahead while the round is in flight (PEARL); that only
    overlaps when `compute` runs off the event loop and the link really waits, as in the draft service.
    `should_stop` is asked before every round; a reason it returns ("cancelled", "deadline_exceeded") ends the
    loop at once and becomes the partial result's `finish_reason`. `stop` strings end the generation where
    one first appears in the decoded text (`finish_reason` "stop"; the result's text ends before it, its
    token ids at the token that completed it). With `open_early` the first round of a fresh verifier session
    drafts nothing and the draft runs its prefill while the target runs its own (the target's first token
    comes from p directly, as a rejection at the first position would): worth it only where `compute` runs
    off the event loop and the draft's prefill is not negligible, as in the draft service under load. Either
    way the draft's prefill runs in chunks and `should_stop` is asked between them. A verifier's refusal
    raises RemoteError.
    """
    tracer = tracer or trace.get_tracer("draftwire")
    spec = session.spec
    policy = policy or make_policy(spec.policy, spec.gamma)
    stats = GenerationStats(mode=spec.mode, gamma=spec.gamma, k=session.k, policy=spec.policy,
                            pipeline=spec.pipeline)
    pipelined = spec.pipeline and spec.mode != "ar"
    prefetch: Prefetch | None = None
    t_start = time.perf_counter()
    stop_at: int | None = None  # where the text ends: the first stop string's index
    checked = 0  # the text length already searched for stop strings
    kept = None  # token ids kept when a stop string ended the generation
    opening = open_early and session.can_open_early()
    should_stop = should_stop or (lambda: None)

    def stopped() -> bool:
        return bool(should_stop())

    if not opening and not session.done:  # the draft's prefill, chunked: a cancel stops it within a chunk
        with tracer.start_as_current_span("draft_prefill"):
            await compute(functools.partial(session.warm_up, stopped))
    while not session.done:
        reason = should_stop()
        if reason:
            session.finish_reason = reason
            break
        t0 = time.perf_counter()
        with tracer.start_as_current_span("round") as span:
            gamma = 0 if opening else policy.next_gamma()
            reused = len(prefetch.tokens) if prefetch is not None else 0
            with tracer.start_as_current_span("draft"):
                req, draft_s = await compute(functools.partial(session.next_request, gamma, prefetch))
            span.set_attributes({"draftwire.round": req.round, "draftwire.gamma": len(req.tokens)})
            in_flight = asyncio.ensure_future(_exchange(session, link, req))
            ahead = None
            try:
                if opening:  # the draft's prefill, while the target runs its own
                    with tracer.start_as_current_span("draft_prefill"):
                        await compute(functools.partial(session.warm_up, stopped))
                    opening = False
                elif pipelined:
                    arrived = threading.Event()
                    in_flight.add_done_callback(lambda _f, ev=arrived: ev.set())
                    with tracer.start_as_current_span("predraft"):
                        ahead = await compute(functools.partial(session.predraft, req, gamma, arrived.is_set))
                verdict, up, down, rebuilt = await in_flight
            finally:  # a cancel (or an error) here must not leave the round running alone, resending as it likes
                in_flight.cancel()
            try:
                new = session.apply(req, verdict)
            except BadVerdict as exc:
                raise RemoteError(BadVerdict.code, str(exc)) from exc
            prefetch = ahead if session.usable(ahead) else None
            span.set_attributes({"draftwire.accepted": verdict.n_accepted, "draftwire.uplink_bytes": up})
        rs = RoundStats(
            round=req.round,
            drafted=len(req.tokens),
            accepted=verdict.n_accepted,
            emitted=len(new),
            uplink_bytes=up,
            downlink_bytes=down,
            draft_s=draft_s,
            verify_s=verdict.verify_s,
            round_s=time.perf_counter() - t0,
            gamma=gamma,
            prefetched=min(reused, len(req.tokens)),
        )
        stats.rounds.append(rs)
        if rs.drafted:
            # a budget-cut round verified fewer than it drafted: only those were tested, the rest not rejected
            tested = rs.drafted if verdict.considered is None else verdict.considered
            policy.observe(RoundObservation(tested, rs.accepted, rs.draft_s, rs.round_s, rs.uplink_bytes,
                                            prefill=rebuilt, batch=verdict.batch, verify_token_s=verdict.token_s))
        if stop and new:
            text = decode(session.generated)
            if (stop_at := find_stop(text, stop, checked)) is not None:
                session.finish_reason = "stop"
                kept = _through_stop(session.generated, len(session.generated) - len(new), decode, stop)
            checked = len(text)
        if on_round is not None:
            await on_round(rs, new)
    stats.wall_s = time.perf_counter() - t_start
    ids = session.generated if kept is None else kept
    stats.new_tokens = len(ids)
    text = decode(ids)
    return GenerationResult(
        text=text if stop_at is None else text[:stop_at],
        token_ids=ids,
        finish_reason=session.finish_reason,
        stats=stats,
    )


def _through_stop(ids: list[int], before: int, decode: Callable[[list[int]], str], stop: Sequence[str]) -> list[int]:
    """The shortest prefix of `ids` (at least `before` long: those were checked) whose text holds a stop
    string: the tokens after the one that completed it are dropped."""
    for n in range(before + 1, len(ids) + 1):
        if find_stop(decode(ids[:n]), stop) is not None:
            return ids[:n]
    return ids


async def _exchange(
    session: DraftSession, link: EdgeTransport, req: VerifyRequest
) -> tuple[Verdict, int, int, bool]:
    """One round trip, resending with history when the verifier does not hold the session.

    Returns the verdict, the bytes up and down, and whether the verifier had to build the session's KV cache
    from the whole history (the first round, or a resync): such a round's times include a prefill.
    """
    up_total = down_total = 0
    resyncs = 0
    backoff = Backoff(initial=0.05, cap=2.0)
    while resyncs <= MAX_RESYNCS_PER_ROUND:
        uplink = req.encode()
        downlink = await link.exchange(uplink, req)
        up_total += len(uplink)
        down_total += len(downlink)
        reply = decode_any(downlink)
        if isinstance(reply, Verdict):
            return reply, up_total, down_total, req.history is not None
        if isinstance(reply, ErrorReply) and reply.code == SessionUnknown.code:
            req = session.reopen(req)
            resyncs += 1
            continue
        if isinstance(reply, ErrorReply) and reply.code == BUSY:
            # the edge's hint spread by jitter (so devices refused together do not return together), never
            # shorter than our own backoff
            wait = max(reply.retry_s * backoff.rng.uniform(1.0, 1.5), backoff.next())
            if session.deadline and time.time() + wait > session.deadline:
                raise RemoteError("deadline_exceeded", f"the verifier stayed busy until the deadline: {reply.message}")
            await asyncio.sleep(wait)
            continue
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        raise RemoteError("bad_reply", f"verifier answered with a {type(reply).__name__}")
    raise RemoteError("resync_failed", f"verifier lost the session {MAX_RESYNCS_PER_ROUND} times in one round")


BUSY = "busy"  # the edge's verification queue is full: wait the reply's retry_s (with jitter) and resend


def decode_round(uplink: bytes) -> VerifyRequest | bytes:
    """A round's request, or the encoded ErrorReply for bytes that are not one."""
    try:
        return VerifyRequest.decode(uplink)
    except ProtocolError as exc:
        return ErrorReply(code=exc.code, message=str(exc)).encode()


def verify_rounds(
    core: VerifierCore, reqs: Sequence[VerifyRequest], budget: int | None = None
) -> list[bytes | None]:
    """The edge's whole job for a batch of rounds (distinct sessions): one forward pass, then each reply
    encoded; a refusal becomes an ErrorReply whose code is the refusal's (`unknown_session`,
    `deadline_exceeded`, `context_length_exceeded`, `non_finite`, `bad_proposal`, or a ProtocolError's).
    None for a round whose pass only fed a chunk of its prefill: pass it in again (`PrefillPending`).
    A session opened for another target vocabulary (`vocab` is not this target's digest) is refused
    `vocab_mismatch` before any model work: its proposals were mapped to ids that mean something else here."""
    refused = {i: _vocab_refusal(core, req) for i, req in enumerate(reqs) if req.vocab}
    refused = {i: r for i, r in refused.items() if r is not None}
    if refused:
        kept = [req for i, req in enumerate(reqs) if i not in refused]
        done = iter(verify_rounds(core, kept, budget) if kept else [])
        return [refused[i] if i in refused else next(done) for i in range(len(reqs))]
    replies = []
    for req, result in zip(reqs, core.handle_batch(reqs, budget), strict=True):
        if isinstance(result, Verdict):
            replies.append(result.encode())
        elif isinstance(result, PrefillPending):
            replies.append(None)
        elif isinstance(result, (SessionUnknown, RoundRefused, ProtocolError, VerificationError)):
            replies.append(ErrorReply(code=result.code, message=brief(str(result)), session=req.session).encode())
        else:
            raise result
    return replies


VOCAB_MISMATCH = "vocab_mismatch"


def _vocab_refusal(core: VerifierCore, req: VerifyRequest) -> bytes | None:
    """An ErrorReply when `req` was mapped to a target vocabulary other than this verifier's."""
    mine = model_vocabulary(core.model)
    if mine is not None and mine.digest == req.vocab:
        return None
    return ErrorReply(code=VOCAB_MISMATCH, session=req.session, message=(
        f"the session's proposals are in target vocabulary {req.vocab[:12]}... but this verifier's target "
        f"{core.model.name} has {mine.digest[:12] if mine else 'no tokenizer'}...")).encode()


def verify_bytes(core: VerifierCore, uplink: bytes) -> bytes:
    """One message alone: decode, verify, encode (the in-process edge; a batch of one)."""
    req = decode_round(uplink)
    if isinstance(req, bytes):
        return req
    while (reply := verify_rounds(core, [req])[0]) is None:  # a chunked prefill: its next chunk
        pass
    return reply


def handle_close(core: VerifierCore, data: bytes) -> bytes | None:
    """A `CloseSession` from `draftwire.sessions.close`: free that session's cache. Never raises: returns
    None when done (closing an unknown session is fine), or an encoded ErrorReply for a malformed message."""
    try:
        msg = CloseSession.decode(data)
    except ProtocolError as exc:
        return ErrorReply(code=exc.code, message=str(exc)).encode()
    core.close(msg.session)
    return None


@dataclass
class InProcessEdge:
    """The edge in this process."""

    core: VerifierCore

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes:
        return verify_bytes(self.core, uplink)


def check_pair(draft: LoadedModel | None, target: LoadedModel) -> CrossVocab | None:
    """Whether token i means the same on both sides, decided by vocabulary digest (never by size alone):
    None for one vocabulary (today's path), the mapping for two, ParamError for a pair that cannot work."""
    if draft is None:
        return None
    try:
        vocab = model_vocabulary(target)
    except ValueError as exc:
        raise ParamError(f"target {target.name}: {exc}") from exc
    return cross_for(draft, vocab, target.vocab_size, target.eos_token_ids)


def new_session(
    draft: LoadedModel | None,
    tokenizer,
    eos_ids: tuple[int, ...],
    vocab_size: int,
    prompt: str | list[int],
    params: SamplingParams,
    spec: SpecParams,
    session_id: str | None = None,
    deadline: float = 0.0,
    resume: Sequence[int] = (),
    cross: CrossVocab | None = None,
) -> DraftSession:
    """A generation on the device. `eos_ids` and `vocab_size` are the target's (in a service: learnt from the
    verifier), never the draft's: stopping is part of the target's distribution. `deadline`: unix seconds.
    `resume`: tokens an earlier run of this session committed; the verifier is opened with them as history.
    `cross`: the draft's tokenizer is not the target's; `tokenizer` (for a text prompt) must be the target's."""
    if spec.mode != "ar" and draft is None:
        raise ParamError(f"mode {spec.mode!r} needs a draft model")
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return DraftSession(
        session=session_id or uuid.uuid4().hex[:16],
        model=draft if spec.mode != "ar" else None,
        prompt_ids=prompt_ids,
        params=params,
        spec=spec,
        eos_ids=eos_ids,
        vocab_size=vocab_size,
        deadline=deadline,
        resumed=list(resume),
        cross=cross if spec.mode != "ar" else None,
    )


class LocalEngine:
    """Device and edge in one process: `draftwire generate --local` and the benchmarks' reference."""

    def __init__(self, target: LoadedModel, draft: LoadedModel | None = None) -> None:
        self.cross = check_pair(draft, target)
        self.target = target
        self.draft = draft
        self.verifier = VerifierCore(target, max_sessions=4)

    async def agenerate(
        self, prompt: str | list[int], params: SamplingParams, spec: SpecParams, link: LinkProfile | None = None,
        stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (), open_early: bool = False,
    ) -> GenerationResult:
        """`link` emulates the device-edge link in-process (waits computed by its shapers); `stop` strings and
        `stop_token_ids` end the generation as on the NATS contract."""
        # one vocabulary: the draft's tokenizer, as always; two: the target's ids are the session's
        tokenizer = self.draft if self.draft is not None and self.cross is None else self.target
        session = new_session(self.draft, tokenizer, (*self.target.eos_token_ids, *stop_token_ids),
                              self.target.vocab_size, prompt, params, spec, cross=self.cross)
        edge: EdgeTransport = InProcessEdge(self.verifier)
        if link is not None:
            from draftwire.shared.io.link_emulator import ShapedEdge

            edge = ShapedEdge(edge, link)
        try:
            return await speculate(session, edge, decode=tokenizer.decode, stop=stop, open_early=open_early)
        finally:
            self.verifier.close(session.session)

    def generate(
        self, prompt: str | list[int], params: SamplingParams, spec: SpecParams, link: LinkProfile | None = None
    ) -> GenerationResult:
        return asyncio.run(self.agenerate(prompt, params, spec, link))


__all__ = [
    "EdgeTransport",
    "GenerationResult",
    "InProcessEdge",
    "LocalEngine",
    "RemoteError",
    "check_pair",
    "decode_round",
    "handle_close",
    "new_session",
    "speculate",
    "verify_bytes",
    "verify_rounds",
]
