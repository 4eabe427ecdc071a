"""Continuous batching for the verifier: every round waiting when the model frees up joins one forward pass.

The asyncio half of batched verification (the model half is `VerifierCore.handle_batch`): requests from any
number of devices wait here, each for its own reply; the moment the worker thread is free, the next batch
(arrival order, one round per session, at most `budget` sessions) goes to it as ONE `verify_rounds` call,
after a short hold only while sessions of the last passes are still on their way (see `_gather`).
A round whose pass fed only a chunk of its prefill goes back to the head of the queue, so its next chunk
shares the next pass with whatever arrived meanwhile; a close of its session ends it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field

from draftwire.shared.core.protocol import ErrorReply, VerifyRequest
from draftwire.shared.core.speculation import BUSY, verify_rounds
from draftwire.shared.core.verifier_sessions import SessionUnknown, VerifierCore

log = logging.getLogger("draftwire.verifier")


@dataclass
class _Waiting:
    req: VerifyRequest
    reply: asyncio.Future


@dataclass
class Batcher:
    """Continuous batching: whenever the model is free, every waiting round (one per session, at most
    `budget` of them) goes into the next forward pass. No window: an idle verifier starts at once.

    The queue is bounded: a round that finds `max_queue` waiting is refused `busy` with a retry hint of
    roughly how long the queue ahead takes to drain, so overload costs the device a wait, never memory here.
    """

    core: VerifierCore
    worker: Executor
    budget: int
    max_queue: int
    waiting: deque = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: int = 0
    forward_s: float = 0.0  # recent seconds per forward pass (for the retry hint and the hold)
    hold: float = 0.0  # at most this fraction of a forward pass spent waiting for missing sessions (0: never)
    max_hold_s: float = 0.25
    recent_s: float = 1.0  # a session served this recently is expected back (it is drafting its next round)
    recent: dict = field(default_factory=dict)  # session -> monotonic time its last verdict went out
    running: list = field(default_factory=list)  # the batch in the forward pass now

    async def submit(self, req: VerifyRequest) -> bytes:
        if len(self.waiting) >= self.max_queue:
            self.busy += 1
            rows = self.core.batch_rows / self.core.forwards if self.core.forwards else 1.0
            passes = len(self.waiting) / max(rows, 1.0) + 1  # forward passes until the queue ahead is served
            return ErrorReply(code=BUSY, message=f"{len(self.waiting)} rounds are waiting for the verifier",
                              session=req.session, retry_s=round(max(passes * self.forward_s, 0.05), 3)).encode()
        item = _Waiting(req, asyncio.get_running_loop().create_future())
        self.waiting.append(item)
        self.wake.set()
        return await item.reply

    def closed(self, session: str) -> None:
        """The session ended (its CloseSession arrived): do not wait for it any more, and end its rounds still
        queued (a prefill between chunks): `unknown_session`, so a device that did still want one resends
        it with history, and nothing more is computed for a device that went away."""
        self.recent.pop(session, None)
        for w in [w for w in (*self.waiting, *self.running) if w.req.session == session]:
            if w in self.waiting:
                self.waiting.remove(w)
            if not w.reply.done():
                w.reply.set_result(ErrorReply(code=SessionUnknown.code, session=session, message=(
                    f"session {session!r} was closed while its round waited; resend with history")).encode())

    async def _gather(self) -> None:
        """Hold the next pass briefly while sessions from the last passes are still drafting their rounds.

        Pure continuous batching splits devices in lock-step into groups that never rejoin: the first round
        back runs alone, the others queue behind it and run together, and the two groups keep alternating. So
        when sessions served within `recent_s` are missing from the queue, the pass waits for them, at most
        `hold` of a forward pass (and `max_hold_s`). A lone session is never missing from its own pass, and an
        idle verifier has no recent sessions: neither ever waits.

        Off by default (`--batch-hold 0`). Devices that answer at once (replay mode) merge with a short hold,
        slow drafts do not. Where the drafts share the verifier's machine, as in `draftwire up` on two cores,
        two alternating groups keep both processes busy and merging them serialises drafting and verifying
        (16 sessions: 9.6 rows per pass but 41 tokens/s with hold 0.5, 4.0 rows and 45 tokens/s with none).
        """
        now = time.monotonic()
        for session, t in list(self.recent.items()):
            if now - t > self.recent_s:
                del self.recent[session]
        if not self.recent or not self.forward_s:
            return
        deadline = now + min(self.hold * self.forward_s, self.max_hold_s)
        while True:
            waiting = {w.req.session for w in self.waiting}
            if len(waiting) >= self.budget or not set(self.recent) - waiting:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), left)

    def _take(self) -> list[_Waiting]:
        """The next batch: waiting rounds in arrival order, one per session, at most `budget` rows."""
        batch, later, sessions = [], deque(), set()
        while self.waiting and len(batch) < self.budget:
            item = self.waiting.popleft()
            if item.reply.done():  # its requester went away (cancelled handler)
                continue
            (later if item.req.session in sessions else batch).append(item)
            sessions.add(item.req.session)
        self.waiting.extendleft(reversed(later))
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting:
                await self._gather()
                if not (batch := self._take()):
                    break
                t0 = time.perf_counter()
                self.running = batch
                try:
                    replies = await loop.run_in_executor(
                        self.worker, verify_rounds, self.core, [w.req for w in batch], self.budget
                    )
                except Exception as exc:  # a bug must not take the edge down for every other session
                    log.exception("verification of a batch of %d failed", len(batch))
                    error = ErrorReply(code="internal", message=f"{type(exc).__name__}: {exc}").encode()
                    replies = [error] * len(batch)
                finally:
                    self.running = []
                self.forward_s = 0.8 * self.forward_s + 0.2 * (time.perf_counter() - t0) if self.forward_s \
                    else time.perf_counter() - t0
                served = time.monotonic()
                again = []
                for w, reply in zip(batch, replies, strict=True):
                    if reply is None:  # one chunk of its prefill done: the next one in the next pass
                        if not w.reply.done():
                            again.append(w)
                        continue
                    self.recent[w.req.session] = served
                    if not w.reply.done():
                        w.reply.set_result(reply)
                self.waiting.extendleft(reversed(again))
