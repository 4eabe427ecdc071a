"""Continuous batching for the verifier: every round waiting when the model frees up joins one forward pass.

The asyncio half of batched verification (the model half is `VerifierCore.handle_batch`): requests from any
number of devices wait here, each for its own reply; the moment the worker thread is free, the next batch
(arrival order, one round per session, at most `budget` sessions) goes to it as ONE `verify_rounds` call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field

from shared.core.protocol import ErrorReply, VerifyRequest
from shared.core.speculation import BUSY, verify_rounds
from shared.core.verifier_sessions import VerifierCore

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
    forward_s: float = 0.0  # recent seconds per forward pass (for the retry hint)

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
            while batch := self._take():
                t0 = time.perf_counter()
                try:
                    replies = await loop.run_in_executor(
                        self.worker, verify_rounds, self.core, [w.req for w in batch], self.budget
                    )
                except Exception as exc:  # a bug must not take the edge down for every other session
                    log.exception("verification of a batch of %d failed", len(batch))
                    error = ErrorReply(code="internal", message=f"{type(exc).__name__}: {exc}").encode()
                    replies = [error] * len(batch)
                self.forward_s = 0.8 * self.forward_s + 0.2 * (time.perf_counter() - t0) if self.forward_s \
                    else time.perf_counter() - t0
                for w, reply in zip(batch, replies, strict=True):
                    if not w.reply.done():
                        w.reply.set_result(reply)
