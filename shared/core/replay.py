"""Recorded speculation rounds, replayed against an edge to measure its capacity alone. Pure, no I/O.

Why: through the whole stack, the device's drafting shares the CPU with the target and hides what the edge can
do. A recording keeps each round's real `VerifyRequest` (the draft's tokens and proposals, the opening one with
its history) and the verdict the edge gave when the session ran alone; replaying those requests under a fresh
session id costs the device nothing, so throughput is the verifier's. A replayed session is only as real as
its verdicts: once one differs from the recorded one (batching may flip a near-tie, a token budget may verify
less), the recorded requests that follow no longer continue the edge's state, so the replayer stops that
session (`compare_verdict` says why).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.protocol import ErrorReply, Verdict, VerifyRequest, decode_any
from draftwire.shared.core.speculation import InProcessEdge, check_pair, new_session, speculate
from draftwire.shared.core.verifier_sessions import VerifierCore


@dataclass(frozen=True)
class Exchange:
    """One round as it ran alone: the device's request and the edge's verdict."""

    request: VerifyRequest
    verdict: Verdict


@dataclass(frozen=True)
class RecordedSession:
    """A whole generation's rounds, in order; the first carries the history that opens the session."""

    prompt_index: int
    rounds: tuple[Exchange, ...]

    @property
    def tokens(self) -> int:
        return sum(e.verdict.n_accepted + 1 for e in self.rounds)


@dataclass
class RecordingEdge:
    """An `EdgeTransport` that passes every round to `inner` and keeps the rounds the edge answered with a
    verdict (a resync's refusal is not a round)."""

    inner: object  # an EdgeTransport
    rounds: list[Exchange] = field(default_factory=list)

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes:
        downlink = await self.inner.exchange(uplink, req)
        reply = decode_any(downlink)
        if isinstance(reply, Verdict):
            self.rounds.append(Exchange(VerifyRequest.decode(uplink), reply))
        return downlink


async def record(draft, target, prompts: list, params: SamplingParams, spec: SpecParams) -> list[RecordedSession]:
    """Each prompt run alone through the speculation loop, in this process (`draft` None for `ar`), its
    rounds kept: the device's real requests and the target's verdicts for them."""
    check_pair(draft, target)
    tokenizer = draft if draft is not None else target
    core = VerifierCore(target, max_sessions=4)
    out = []
    for i, prompt in enumerate(prompts):
        session = new_session(draft, tokenizer, target.eos_token_ids, target.vocab_size, prompt, params, spec)
        edge = RecordingEdge(InProcessEdge(core))
        try:
            await speculate(session, edge, decode=tokenizer.decode)
        finally:
            core.close(session.session)
        out.append(RecordedSession(i, tuple(edge.rounds)))
    return out


def rewrite_session(req: VerifyRequest, session: str, sent_at: float | None = None) -> bytes:
    """`req` under another session id (and, if given, a fresh send time), encoded; everything else kept, so
    the digest of an opening request's history still holds (the digest does not cover the id)."""
    changes: dict = {"session": session}
    if sent_at is not None:
        changes["sent_at"] = sent_at
    return dataclasses.replace(req, **changes).encode()


def _decision(v: Verdict) -> Verdict:
    """What the edge decided, without who asked, when, or any field a newer edge adds."""
    return Verdict(session="-", round=v.round, base=v.base, n_accepted=v.n_accepted, token=v.token, verify_s=0.0,
                   residual=v.residual)


def compare_verdict(req: VerifyRequest, recorded: Verdict, got: Verdict) -> str | None:
    """None when the edge decided round `req` as it did alone (round, base, acceptance, token, DSSD residual;
    the session id and timings may differ). Otherwise why not: `budget_cut` when it verified only a prefix of
    what it accepted alone and so accepted that prefix and emitted the next draft token (a per-forward token
    budget at work, still the target's choice), `diverged` for a different decision (a flipped near-tie)."""
    if _decision(got) == _decision(recorded):
        return None
    m = got.n_accepted
    if (got.round, got.base) == (recorded.round, recorded.base) and got.residual is None and m < recorded.n_accepted \
            and got.token == int(req.tokens[m]):
        return "budget_cut"
    return "diverged"


def retry_hint(reply: ErrorReply, cap: float = 2.0) -> float | None:
    """Seconds a `busy` refusal asks the device to wait (its `retry_s`), at most `cap`; None without a hint."""
    value = getattr(reply, "retry_s", 0.0) or 0.0
    return min(float(value), cap) if value > 0 else None


@dataclass
class ReplayTally:
    """What one level's replayers saw: sessions started and completed, rounds verified, verified tokens
    (n_accepted + 1 per verdict), `busy` refusals, each round's latency (first send to verdict, busy waits
    included), and the sessions stopped early by reason (`diverged`, or the edge's error code)."""

    sessions: int = 0
    completed: int = 0
    rounds: int = 0
    tokens: int = 0
    busy: int = 0
    latencies: list[float] = field(default_factory=list)
    stopped: dict[str, int] = field(default_factory=dict)
    divergences: list[dict] = field(default_factory=list)

    def verdict(self, exchange: Exchange, got: Verdict, latency: float) -> bool:
        """Count one verdict; True if it matches the recording (the session may go on), else the session is
        stopped with `compare_verdict`'s reason."""
        self.rounds += 1
        self.tokens += got.n_accepted + 1
        self.latencies.append(latency)
        reason = compare_verdict(exchange.request, exchange.verdict, got)
        if reason is None:
            return True
        self.stop(reason)
        if reason == "diverged" and len(self.divergences) < 20:
            rec = exchange.verdict
            self.divergences.append({"round": rec.round, "base": rec.base, "recorded": [rec.n_accepted, rec.token],
                                     "got": [got.n_accepted, got.token]})
        return False

    def stop(self, reason: str) -> None:
        self.stopped[reason] = self.stopped.get(reason, 0) + 1
