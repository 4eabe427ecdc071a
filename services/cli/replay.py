"""`draftwire loadtest --replay`: the edge's capacity alone, fed recorded real draft proposals.

Recording runs each prompt in this process (the real draft model and a `VerifierCore` of the target, greedy),
keeping every round's request and verdict (`draftwire.shared.core.replay`). Replaying needs only NATS and one verifier
service: N replayers each send a recorded session's rounds in order to `draftwire.verify` under a fresh session
id, then the next recording, until the level's time is up. The device costs nothing here, so the verified
tokens/s are the verifier's. A `busy` refusal waits its retry hint (or a short backoff) and resends; a verdict
that differs from the recorded one ends that replayed session (counted), since the recorded rounds after it
no longer continue the edge's state.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid

import nats.errors

from draftwire.services.cli.stack import Stack, service_args
from draftwire.shared.core import replay
from draftwire.shared.core.backoff import Backoff
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.protocol import CloseSession, ErrorReply, ProtocolError, Verdict, decode_any
from draftwire.shared.core.replay import Exchange, RecordedSession, ReplayTally, retry_hint, rewrite_session
from draftwire.shared.io.bus import SUBJECTS, flush
from draftwire.shared.io.nats_server import EmbeddedNats

REQUEST_TIMEOUT_S = 120.0  # one round, queueing behind every other session's included
BUSY_GRACE_S = 10.0  # after the level's end, stop resending a refused round


async def record(args, prompts: list[str]) -> list[RecordedSession]:
    """Each prompt run alone, in process, greedy, exactly `args.max_new_tokens` new tokens."""
    from draftwire.shared.models.runtime import load_model

    target = await asyncio.to_thread(load_model, args.target_model, args.target_dtype, False,
                                     getattr(args, "target_device", "cpu"))
    draft = None
    if args.mode != "ar":
        draft = await asyncio.to_thread(load_model, args.draft_model, args.draft_dtype, False,
                                        getattr(args, "draft_device", "cpu"))
    params = SamplingParams(temperature=0.0, seed=0, min_new_tokens=args.max_new_tokens,
                            max_new_tokens=args.max_new_tokens)
    return await replay.record(draft, target, prompts, params, SpecParams(mode=args.mode, gamma=args.gamma, k=args.k))


async def start_edge(args, *, quiet: bool) -> Stack:
    """An embedded NATS and one verifier service, started as `draftwire up` starts it (plus
    `--verifier-flags`)."""
    server = EmbeddedNats()
    await server.start()
    stack = Stack(url=server.url, nats=server, quiet=quiet)
    try:
        argv = [sys.executable, "-m", "draftwire.services.verifier", "--nats", server.url, *service_args("verifier", args),
                *shlex.split(getattr(args, "verifier_flags", None) or "")]
        if not await stack.spawn("verifier", argv, {**os.environ, "DRAFTWIRE_NATS_URL": server.url}):
            raise RuntimeError(f"the verifier did not become ready: {', '.join(stack.dead())}")
    except BaseException:
        await stack.stop()
        raise
    return stack


async def _round(nc, exchange: Exchange, session: str, end: float, tally: ReplayTally) -> bool:
    """Send one recorded round until the edge decides it; True if the session may go on."""
    t0 = time.monotonic()
    backoff = Backoff(initial=0.01, cap=0.5)
    while True:
        data = rewrite_session(exchange.request, session, sent_at=time.time())
        try:
            msg = await nc.request(SUBJECTS.verify, data, timeout=REQUEST_TIMEOUT_S)
            reply = decode_any(msg.data)
        except TimeoutError:
            tally.stop("no_reply")
            return False
        except nats.errors.NoRespondersError:
            tally.stop("no_responders")
            return False
        except ProtocolError:
            tally.stop("bad_reply")
            return False
        if isinstance(reply, Verdict):
            return tally.verdict(exchange, reply, time.monotonic() - t0)
        if isinstance(reply, ErrorReply) and reply.code == "busy":
            tally.busy += 1
            if time.monotonic() > end + BUSY_GRACE_S:
                tally.stop("busy")
                return False
            hint = retry_hint(reply)
            await asyncio.sleep(hint if hint is not None else backoff.next())
            continue
        tally.stop(reply.code if isinstance(reply, ErrorReply) else "bad_reply")
        return False


async def _replayer(nc, recordings: list[RecordedSession], first: int, stride: int, end: float,
                    tally: ReplayTally) -> None:
    """Replays recordings first, first + stride, ... (cycling) until `end`; finishes the round in flight."""
    i = first
    while time.monotonic() < end:
        rec = recordings[i % len(recordings)]
        i += stride
        session = uuid.uuid4().hex[:16]
        tally.sessions += 1
        try:
            for exchange in rec.rounds:
                if time.monotonic() >= end:
                    break
                if not await _round(nc, exchange, session, end, tally):
                    break
            else:
                tally.completed += 1
        finally:  # as a device does: free the edge's cache at once
            await nc.publish(SUBJECTS.sessions_close, CloseSession(session).encode())


async def replay_level(nc, recordings: list[RecordedSession], n: int, seconds: float) -> tuple[float, ReplayTally]:
    """N concurrent replayers for `seconds`; returns the wall time (to the last round's verdict) and tally."""
    recordings = [r for r in recordings if r.rounds]
    if not recordings:
        raise ValueError("nothing was recorded to replay")
    tally = ReplayTally()
    t0 = time.monotonic()
    await asyncio.gather(*(_replayer(nc, recordings, i, n, t0 + seconds, tally) for i in range(n)))
    await flush(nc)
    return time.monotonic() - t0, tally
