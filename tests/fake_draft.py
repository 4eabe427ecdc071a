"""A stand-in for the draft service that implements the draft's side of docs/sessions.md, with no model.

It takes jobs on `draftwire.draft.start` (queue group `drafts`) and answers `{"accepted": true}` at once,
answers pings on `draftwire.draft.session.<session>` while it runs the session, honours
`draftwire.cancel.<id>`, and after `delay` seconds publishes a canned result (the prompt upper-cased) to
`draftwire.done.<session>` with `js.publish`. `die()` makes it vanish the way a killed process does.

With `load` set it is a `draftwire-draft` micro service, as a real draft is: it also serves its own
`draftwire.draft.start.<instance>` and reports `{"active": load + sessions it runs, "max": max_concurrent}`
in its `$SRV.STATS` reply. Without, it is an older draft that reports nothing: only the queue group.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgpack

from draftwire.shared.core.prompt_request import GenerateJob
from draftwire.shared.io.bus import SUBJECTS, ensure_done_stream, flush
from draftwire.shared.io.service_shell import ServiceContext, register


def canned(job: GenerateJob, instance: str = "fake-draft") -> dict:
    return {
        "id": job.id,
        "text": job.prompt.upper(),
        "token_ids": list(job.prompt.encode())[:16],
        "finish_reason": "length",
        "stats": {
            "rounds": 2,
            "acceptance_rate": 0.75,
            "mode": job.spec.mode,
            "gamma": job.spec.gamma,
            "k": job.spec.k,
            "seed": job.params.seed,
            "draft_instance": instance,
        },
    }


class FakeDraft:
    """behaviour: "ok" (done after `delay`), "hold" (done once `release` is set), "hang" (never done, but
    alive), "reject" (answers the start with an error body), "silent" (takes the start, never answers it)."""

    def __init__(
        self,
        nc,
        behaviour: str = "ok",
        *,
        delay: float = 0.0,
        instance: str = "fake-draft",
        cancels: bool = True,
        load: int | None = None,
        max_concurrent: int = 8,
    ) -> None:
        self.nc, self.js, self.behaviour, self.delay, self.instance = (
            nc,
            nc.jetstream(),
            behaviour,
            delay,
            instance,
        )
        self.cancels = cancels  # False: ignores draftwire.cancel.<id>, like a draft too busy to notice
        self.generated: list[
            int
        ] = []  # what session pings report as committed (a resumed run continues after)
        self.jobs: list[GenerateJob] = []
        self.headers: list[dict] = []
        self.pings = 0
        self.finished: list[str] = []  # sessions whose result is stored and whose session subject is gone
        self.load, self.max_concurrent = load, max_concurrent
        self.subjects: list[str] = []  # the subject each start came on
        self.svc = None
        self.received = asyncio.Event()
        self.release = asyncio.Event()
        self._running: dict[str, tuple[GenerateJob, object, asyncio.Task]] = {}  # by request id
        self._subs: list = []

    async def start(self) -> FakeDraft:
        await ensure_done_stream(self.js)
        self._subs = [await self.nc.subscribe(SUBJECTS.cancel_all, cb=self._on_cancel)]
        if self.load is None:
            start = await self.nc.subscribe(SUBJECTS.draft_start, queue="drafts", cb=self._on_start)
            self._subs.append(start)
        else:
            ctx = ServiceContext(name="draft", instance=self.instance, args=None, nc=self.nc, tracer=None)
            self.svc = await register(
                ctx, "draftwire-draft", "fake draft",
                [(SUBJECTS.draft_start, self._on_start, "drafts"),
                 (SUBJECTS.draft_start_instance(self.instance), self._on_start, self.instance)],
                stats=lambda: {"active": self.load + len(self._running), "max": self.max_concurrent},
            )
        await flush(self.nc)
        return self

    async def die(self) -> None:
        """Stop answering anything and never publish: what the scheduler sees of a SIGKILLed draft."""
        if self.svc is not None:
            with contextlib.suppress(Exception):
                await self.svc.stop()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for _, session_sub, task in list(self._running.values()):
            task.cancel()
            with contextlib.suppress(Exception):
                await session_sub.unsubscribe()
        self._running.clear()
        await flush(self.nc)

    stop = die

    async def _on_start(self, msg) -> None:
        job = GenerateJob.decode(msg.data)
        self.jobs.append(job)
        self.subjects.append(msg.subject)
        self.headers.append(dict(msg.headers or {}))
        self.received.set()
        if self.behaviour == "silent":
            return
        if self.behaviour == "reject":
            body = {"error": {"code": "context_length_exceeded", "message": "prompt too long"}}
            await msg.respond(msgpack.packb(body))
            return
        session_sub = await self.nc.subscribe(SUBJECTS.draft_session(job.session), cb=self._on_ping)
        task = asyncio.create_task(self._run(job))
        self._running[job.id] = (job, session_sub, task)
        await msg.respond(msgpack.packb({"accepted": True, "instance": self.instance}))

    async def _on_ping(self, msg) -> None:
        self.pings += 1
        await msg.respond(msgpack.packb({"instance": self.instance, "round": 1, "generated": self.generated}))

    async def _on_cancel(self, msg) -> None:
        rid = msg.subject.rsplit(".", 1)[-1]
        if self.cancels and rid in self._running:
            job = self._running[rid][0]
            body = {"error": {"code": "cancelled", "message": "cancelled"}, "text": "PART", "token_ids": [1]}
            await self._finish(job, body)

    async def _run(self, job: GenerateJob) -> None:
        if self.behaviour == "hang":
            return
        if self.behaviour == "hold":
            await self.release.wait()
        await asyncio.sleep(self.delay)
        await self._finish(job, canned(job, self.instance))

    async def _finish(self, job: GenerateJob, body: dict) -> None:
        entry = self._running.pop(job.id, None)
        if entry is None:
            return
        await self.js.publish(SUBJECTS.done(job.session), msgpack.packb(body))
        with contextlib.suppress(Exception):
            await entry[1].unsubscribe()
            await flush(self.nc)  # the server knows the session is gone before anyone is told it finished
        self.finished.append(job.session)
        if entry[2] is not asyncio.current_task():
            entry[2].cancel()
