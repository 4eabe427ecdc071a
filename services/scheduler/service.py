"""Scheduler: takes prompts, stores each as a job in JetStream, runs it on a draft instance, replies once.

Intake. `draftwire.prompts` is a micro endpoint in queue group `schedulers`, so with no scheduler running a
request gets "no responders" at once. The handler parses and validates (bad input is answered at once),
gives the job a fresh session id and an absolute deadline, and stores it with its reply subject on
`draftwire.jobs.<id>` in DRAFTWIRE_JOBS, waiting for the PubAck; a second job with an id still in flight is
refused by the stream (one message per subject) and answered `duplicate_id`. The handler never waits for a
generation. Fire-and-forget prompts (`js.publish` to `draftwire.submit`, stream DRAFTWIRE_SUBMIT) become jobs
the same way, with no reply subject; their results and errors go to `draftwire.results.<id>` only.

Work. All schedulers pull from one durable consumer with a short ack_wait, send in-progress acks every
second while working, and hold at most `--max-inflight` jobs each. For a job: a result already in
DRAFTWIRE_DONE is delivered; a draft still running the session (its session subject answers) is followed;
otherwise the job goes to `draftwire.draft.start`, retried with backoff while no draft instance exists
(`no_draft` at the deadline). While it runs the scheduler pings the session every second; "no responders"
twice means the draft died, and the same job (same session; seeded rounds give the same output) is
dispatched again. A scheduler killed mid-job stops heartbeating, and JetStream hands the job to another
one, which resumes it the same way. Past the deadline plus a grace with no result: `deadline_exceeded`.

One reply. Before replying, a scheduler creates key `<session>` in the KV bucket DRAFTWIRE_DELIVERED; one
that cannot (the key exists) only acks. The reply goes to the stored reply subject and to
`draftwire.results.<id>`, then the ack deletes the job and frees the id. A scheduler killed between the
create and the publish loses that reply: at most one reply, never two.

Cancel. `draftwire.cancel.<id>` ends a job that is queued or waiting for a draft at once (`cancelled`); a
running job is stopped by its draft, whose done message carries `cancelled` and the partial text (if none
comes within a few seconds the scheduler replies `cancelled` itself). Cancels are remembered for a while,
so a job fetched after its cancel is answered without running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import Request
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.core.backoff import Backoff
from shared.core.params import (
    DEFAULT_GAMMA,
    DEFAULT_K,
    DEFAULT_MODE,
    DEFAULT_POLICY,
    MODES,
    POLICIES,
    ParamError,
    SpecParams,
)
from shared.core.prompt_request import (
    REPLY_CONTENT_TYPES,
    JobRecord,
    PromptRequest,
    RequestError,
    build_job,
    encode_reply,
    error_body,
    parse_prompt,
)
from shared.io import bus
from shared.io.bus import (
    DONE_STREAM,
    JOBS_CONSUMER,
    JOBS_STREAM,
    ROOT,
    SUBJECTS,
    ensure_delivered_bucket,
    ensure_done_stream,
    ensure_jobs_stream,
    ensure_submit_stream,
    extract_context,
    inject_headers,
    jobs_subscription,
    submit_subscription,
    validate_token,
)
from shared.io.service_shell import ServiceContext, env, env_float, env_int, register, run, service_parser

log = logging.getLogger("draftwire.scheduler")

SESSIONS_SUBJECT = f"{ROOT}.scheduler.sessions"
ACK_WAIT_S = 4.0  # JetStream hands a job to another scheduler this long after its holder stopped heartbeating
HEARTBEAT_S = 1.0  # in-progress acks while working, well inside ACK_WAIT_S
MAX_ACK_PENDING = 1024  # jobs in flight across all schedulers
FETCH_S = 1.0  # one pull request's lifetime
PUBLISH_TIMEOUT_S = 5.0  # waiting for a PubAck
START_TIMEOUT_S = 5.0  # the draft answers `draftwire.draft.start` at once; longer means it may not have it
PING_S = 1.0  # liveness pings of the session subject while the draft runs it
PING_TIMEOUT_S = 0.5
DEAD_AFTER = 2  # consecutive "no responders" before the job is dispatched again
DEADLINE_GRACE_S = 3.0  # the draft enforces the deadline and reports; this long after it we answer ourselves
CANCEL_GRACE_S = 3.0  # a running job's draft reports its cancel (with the partial text) within this
CLOCK_SLACK_S = 1.0  # a cancel applies to jobs accepted up to this long after it (clocks of two hosts)
DELIVERED_MARGIN_S = 15 * 60.0
JS_LIMIT_EXCEEDED = 10077  # a stream refused a message: per subject (a duplicate id) or in total (full)
SERVICE_ERROR_HEADER = "Nats-Service-Error"


def build_parser():
    p = service_parser("scheduler", __doc__.splitlines()[0])
    p.add_argument(
        "--default-mode",
        default=env("DEFAULT_MODE", DEFAULT_MODE),
        choices=MODES,
        help="mode for requests that ask for `auto` (the default) [DRAFTWIRE_DEFAULT_MODE]",
    )
    p.add_argument(
        "--default-gamma",
        type=int,
        default=env_int("DEFAULT_GAMMA", DEFAULT_GAMMA),
        help="draft tokens per round unless the request sets gamma [DRAFTWIRE_DEFAULT_GAMMA]",
    )
    p.add_argument(
        "--default-k",
        type=int,
        default=env_int("DEFAULT_K", DEFAULT_K),
        help="top-K per draft position unless the request sets k [DRAFTWIRE_DEFAULT_K]",
    )
    p.add_argument(
        "--default-policy",
        default=env("DEFAULT_POLICY", DEFAULT_POLICY),
        choices=POLICIES,
        help="draft-length policy unless the request sets policy [DRAFTWIRE_DEFAULT_POLICY]",
    )
    p.add_argument(
        "--default-pipeline",
        action=argparse.BooleanOptionalAction,
        default=env("DEFAULT_PIPELINE", "0") not in ("0", "false", "no", ""),
        help="pipelined (PEARL) drafting unless the request sets pipeline [DRAFTWIRE_DEFAULT_PIPELINE]",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=env_float("REQUEST_TIMEOUT", 600.0),
        help="seconds a request may take, waiting for a draft instance included: the default of the "
        "request field timeout_s and its cap (larger values are clamped) [DRAFTWIRE_REQUEST_TIMEOUT]",
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=env_int("MAX_INFLIGHT", 8),
        help="jobs this instance works on at once; the rest wait in JetStream [DRAFTWIRE_MAX_INFLIGHT]",
    )
    return p


# --- policy (pure) ----------------------------------------------------------------------------------------


def draft_result(data: bytes, headers: Mapping[str, str] | None, request_id: str) -> dict:
    """A draft's msgpack body as a reply body: its result or error as is, anything else a draft_error."""
    if headers and headers.get(SERVICE_ERROR_HEADER):
        return error_body(
            "draft_error", f"draft instance failed: {headers[SERVICE_ERROR_HEADER]}", request_id
        )
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - msgpack raises a zoo (ExtraData, FormatError, UnicodeDecodeError)
        body = None
    if not isinstance(body, dict):
        return error_body("draft_error", "draft instance sent an undecodable reply", request_id)
    return {**body, "id": request_id}


def start_outcome(data: bytes, headers: Mapping[str, str] | None, request_id: str) -> dict | None:
    """The draft's answer to `draftwire.draft.start`: None when it took the job, else the body to reply."""
    body = draft_result(data, headers, request_id)
    if "error" in body:
        return body
    if body.get("accepted") is True:
        return None
    return error_body(
        "draft_error", "draft instance answered the job with neither accepted nor an error", request_id
    )


class RecentCancels:
    """Cancels seen lately, bounded and expiring, so a job fetched after its cancel never runs.

    A cancel applies to jobs accepted before it (give or take CLOCK_SLACK_S between hosts), so a later
    request that reuses the id is not cancelled by an old cancel. Time is passed in.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries = ttl, max_entries
        self._at: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str, now: float) -> None:
        self._at[request_id] = now
        self._at.move_to_end(request_id)
        while self._at and (
            len(self._at) > self.max_entries or next(iter(self._at.values())) < now - self.ttl
        ):
            self._at.popitem(last=False)

    def applies(self, request_id: str, accepted_at: float, now: float) -> bool:
        at = self._at.get(request_id)
        return at is not None and now - at <= self.ttl and at >= accepted_at - CLOCK_SLACK_S

    def __len__(self) -> int:
        return len(self._at)


@dataclass(eq=False)
class Work:
    """A job this scheduler holds: its record, the JetStream message to heartbeat and ack, its state."""

    record: JobRecord
    msg: Msg
    started: float = field(default_factory=time.monotonic)
    state: str = "received"
    acked: bool = False
    cancelled_at: float | None = None  # monotonic
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def cancel(self) -> None:
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        self.cancel_event.set()


def sessions_snapshot(work: list[Work], now: float, wall: float) -> list[dict]:
    return [
        {
            "id": w.record.job.id,
            "session": w.record.job.session,
            "state": w.state,
            "age_s": round(now - w.started, 3),
            "deadline_in_s": round(w.record.job.deadline - wall, 3),
        }
        for w in sorted(work, key=lambda w: w.started)
    ]


# --- the async shell --------------------------------------------------------------------------------------


class Scheduler:
    def __init__(
        self,
        nc: Client,
        tracer,
        instance: str,
        defaults: SpecParams,
        request_timeout: float,
        max_inflight: int,
    ) -> None:
        self.nc, self.js, self.tracer, self.instance = nc, nc.jetstream(), tracer, instance
        self.defaults, self.timeout = defaults, request_timeout
        self.slots = asyncio.Semaphore(max_inflight)
        self.work: dict[int, Work] = {}  # by stream sequence of the job message
        self.cancels = RecentCancels(ttl=request_timeout + DEADLINE_GRACE_S)
        self.stopping = False
        self.delivered = None
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()
        self._subs: list = []

    async def start(self) -> None:
        await ensure_jobs_stream(self.js, ack_wait=ACK_WAIT_S, max_ack_pending=MAX_ACK_PENDING)
        await ensure_submit_stream(self.js)
        await ensure_done_stream(self.js)
        self.delivered = await ensure_delivered_bucket(self.js, ttl=2 * self.timeout + DELIVERED_MARGIN_S)
        jobs, submits = await jobs_subscription(self.js), await submit_subscription(self.js)
        self._subs = [jobs, submits, await self.nc.subscribe(SUBJECTS.cancel_all, cb=self._on_cancel)]
        self._tasks = [
            asyncio.create_task(self._pull_loop(jobs), name="scheduler-jobs"),
            asyncio.create_task(self._submit_loop(submits), name="scheduler-submit"),
        ]

    async def stop(self) -> None:
        """Stop pulling, then nak unfinished jobs so another scheduler (or the next start) resumes them."""
        self.stopping = True
        for t in self._tasks:  # cancelling a fetch loses nothing: the server drops a pull whose inbox is gone
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sub in self._subs:  # pull subscriptions too: a connection's drain would wait on their inboxes
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        tasks = [w.task for w in self.work.values() if w.task is not None] + list(self._side_tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- intake -------------------------------------------------------------------------------------------

    async def prompts_endpoint(self, req: Request) -> None:
        """Validate and store; the reply comes from whichever scheduler runs the job."""
        reply = req._msg.reply or None  # nats.micro.Request has no public accessor for the reply subject
        headers = req.headers or {}
        try:
            parsed, fmt = parse_prompt(req.data, headers)
        except RequestError as exc:
            body = error_body(exc.code, str(exc), exc.request_id)
            await self._answer(body, exc.format or "json", reply, exc.request_id)
            return
        if (body := await self._enqueue(parsed, fmt, reply, headers)) is not None:
            # duplicate_id goes to the requester only: results.<id> belongs to the job already running
            duplicate = body["error"]["code"] == "duplicate_id"
            await self._answer(body, fmt, reply, None if duplicate else parsed.id)

    async def _enqueue(
        self, req: PromptRequest, fmt: str, reply: str | None, headers: Mapping[str, str]
    ) -> dict | None:
        """Store the job; None once JetStream confirmed it, else the error body to answer with."""
        now = time.time()
        job = build_job(req, fmt, self.defaults, now=now, max_timeout=self.timeout)
        record = JobRecord(job, reply, now)
        trace = inject_headers(None, extract_context(headers))  # the worker's span joins the user's trace
        try:
            await self.js.publish(
                SUBJECTS.jobs(job.id), record.encode(), timeout=PUBLISH_TIMEOUT_S, headers=trace or None
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == JS_LIMIT_EXCEEDED and "per subject" in (exc.description or ""):
                message = f"a request with id {job.id!r} is in flight; wait for its result or use another id"
                return error_body("duplicate_id", message, job.id)
            if exc.err_code == JS_LIMIT_EXCEEDED:
                return error_body("overloaded", "the job queue is full; retry later", job.id)
            return error_body("unavailable", f"could not store the job: {exc.description or exc!r}", job.id)
        except (TimeoutError, nats.errors.Error) as exc:
            return error_body("unavailable", f"could not store the job: {exc!r}", job.id)
        return None

    async def _submit_loop(self, sub) -> None:
        while not self.stopping:
            try:
                msgs = await sub.fetch(16, timeout=FETCH_S)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnects, consumer errors: keep pulling
                log.warning("fetching submissions failed: %r; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await self._take_submission(msg)

    async def _take_submission(self, msg: Msg) -> None:
        """A fire-and-forget prompt becomes a job; acked once stored or answered, kept while jobs are full."""
        headers = msg.headers or {}
        try:
            req, fmt = parse_prompt(msg.data, headers)
        except RequestError as exc:
            if exc.request_id is None:
                log.warning("dropping a submission nobody can be told about: %s: %s", exc.code, exc)
            await self._answer(
                error_body(exc.code, str(exc), exc.request_id), exc.format or "json", None, exc.request_id
            )
            await _quietly(msg.ack())
            return
        body = await self._enqueue(req, fmt, None, headers)
        if body is None:
            await _quietly(msg.ack())
        elif body["error"]["code"] == "duplicate_id":
            log.warning("dropping submission %s: a request with that id is in flight", req.id)
            await _quietly(msg.ack())
        else:
            log.warning("submission %s not stored yet (%s); retrying", req.id, body["error"]["message"])
            await _quietly(msg.nak(delay=1.0))

    async def _answer(self, body: dict, fmt: str, reply: str | None, request_id: str | None) -> None:
        """Publish a reply to the requester (if any) and to `results.<id>` (if the id is known)."""
        data = encode_reply(body, fmt)
        if len(data) > self.nc.max_payload:
            message = f"result is {len(data)} bytes, over the server's max_payload {self.nc.max_payload}"
            data = encode_reply(error_body("oversize", message, request_id), fmt)
        headers = {"Content-Type": REPLY_CONTENT_TYPES[fmt]}
        if reply:
            await bus.publish(self.nc, reply, data, headers)
        if request_id:
            await bus.publish(self.nc, SUBJECTS.results(request_id), data, headers)

    async def _deliver_once(self, record: JobRecord, body: dict) -> bool:
        """Reply unless another scheduler already did for this session (the KV create decides)."""
        job = record.job
        try:
            await self.delivered.create(job.session, self.instance.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("job %s (session %s) was answered already; not replying again", job.id, job.session)
            return False
        await self._answer(body, job.format, record.reply, job.id)
        return True

    # --- work ---------------------------------------------------------------------------------------------

    async def _pull_loop(self, sub) -> None:
        while not self.stopping:
            await self.slots.acquire()
            try:
                msgs = await sub.fetch(1, timeout=FETCH_S)
            except TimeoutError:
                self.slots.release()
                continue
            except asyncio.CancelledError:
                self.slots.release()
                raise
            except Exception as exc:  # noqa: BLE001 - reconnects, consumer errors: keep pulling
                self.slots.release()
                log.warning("fetching jobs failed: %r; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await self._admit(msg)

    async def _admit(self, msg: Msg) -> None:
        """Start working on a delivered job; the work owns the slot the fetch took."""
        seq = msg.metadata.sequence.stream
        if (held := self.work.get(seq)) is not None or self.stopping:
            # A redelivery of a job still in progress here (an in-progress ack got lost): keep working on it
            # with the newer delivery's ack subject. On shutdown, hand the job straight back.
            if held is not None and not self.stopping:
                held.msg = msg
            else:
                await _quietly(msg.nak())
            self.slots.release()
            return
        try:
            record = JobRecord.decode(msg.data)
        except RequestError as exc:
            log.error("dropping an unreadable job record (stream seq %d): %s", seq, exc)
            await _quietly(msg.term())
            self.slots.release()
            return
        w = Work(record=record, msg=msg)
        self.work[seq] = w
        if self.cancels.applies(record.job.id, record.accepted_at, time.time()):
            w.cancel()
        w.task = asyncio.create_task(self._serve(w, seq), name=f"job-{record.job.id}")

    async def _serve(self, w: Work, seq: int) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(w))
        job = w.record.job
        try:
            with self.tracer.start_as_current_span(
                "scheduler.request", context=extract_context(w.msg.headers), kind=SpanKind.CONSUMER
            ) as span:
                span.set_attributes(
                    {
                        "draftwire.request_id": job.id,
                        "draftwire.session": job.session,
                        "draftwire.deliveries": w.msg.metadata.num_delivered,
                        "draftwire.scheduler_instance": self.instance,
                        "draftwire.has_reply": w.record.reply is not None,
                        "draftwire.mode": job.spec.mode,
                        "draftwire.gamma": job.spec.gamma,
                        "draftwire.k": job.spec.k,
                        "draftwire.format": job.format,
                    }
                )
                body = await self._outcome(w)
                if isinstance(error := body.get("error"), dict):
                    code = str(error.get("code", "error"))
                    span.set_status(Status(StatusCode.ERROR, code))
                    span.set_attribute("draftwire.error", code)
                w.state = "delivering"
                await self._deliver_once(w.record, body)
            await self._ack(w)
        except asyncio.CancelledError:
            if not w.acked:
                await _quietly(w.msg.nak())
            raise
        except Exception:  # one job must never take the loop or another job down
            log.exception("job %s failed here; it will be redelivered", job.id)
            if not w.acked:
                await _quietly(w.msg.nak(delay=1.0))
        finally:
            heartbeat.cancel()
            self.work.pop(seq, None)
            self.slots.release()

    async def _heartbeat(self, w: Work) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await _quietly(w.msg.in_progress())

    async def _outcome(self, w: Work) -> dict:
        """The body to reply with: a stored result, the result of a draft still running it, or a new run."""
        job = w.record.job
        done = await self.nc.subscribe(SUBJECTS.done(job.session))  # before any dispatch: no result slips by
        try:
            if (body := await self._stored_result(w)) is not None:
                return body
            if await self._ping(job.session):  # a cancel of a running job is its draft's to report
                log.info("job %s: attaching to the draft still running session %s", job.id, job.session)
                w.state = "running"
            elif w.cancelled_at is not None:
                return _cancelled(job.id)
            elif time.time() > job.deadline:
                return error_body("deadline_exceeded", "the deadline passed before the job ran", job.id)
            elif (body := await self._dispatch(w)) is not None:
                return body
            return await self._follow(w, done)
        finally:
            with contextlib.suppress(Exception):
                await done.unsubscribe()

    async def _follow(self, w: Work, done) -> dict:
        """Wait for the draft's done message, pinging the session; dispatch again when the draft died."""
        job = w.record.job
        misses = 0
        while True:
            with contextlib.suppress(nats.errors.TimeoutError):
                msg = await done.next_msg(timeout=PING_S)
                return draft_result(msg.data, msg.headers, job.id)
            if w.cancelled_at is not None and time.monotonic() - w.cancelled_at > CANCEL_GRACE_S:
                return _cancelled(job.id)
            if time.time() > job.deadline + DEADLINE_GRACE_S:
                return error_body("deadline_exceeded", "no result from the draft by the deadline", job.id)
            alive = await self._ping(job.session)
            misses = misses + 1 if alive is False else 0
            if misses < DEAD_AFTER:
                continue
            if (body := await self._stored_result(w)) is not None:
                return body
            log.warning(
                "job %s: the draft running session %s is gone; dispatching again", job.id, job.session
            )
            if (body := await self._dispatch(w)) is not None:
                return body
            misses = 0

    async def _dispatch(self, w: Work) -> dict | None:
        """Hand the job to a draft instance; None once one took it, else the body to reply with."""
        job = w.record.job
        payload = job.encode()
        backoff = Backoff(initial=0.1, cap=1.0)
        while True:
            if w.cancelled_at is not None:
                return _cancelled(job.id)
            if time.time() > job.deadline:
                return error_body("no_draft", "no draft instance took the job before its deadline", job.id)
            w.state = "dispatching"
            try:
                msg = await bus.request(self.nc, SUBJECTS.draft_start, payload, timeout=START_TIMEOUT_S)
            except nats.errors.NoRespondersError:
                w.state = "waiting_for_draft"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.cancel_event.wait(), backoff.next())
                continue
            except TimeoutError:  # a draft may have taken it after all: the liveness pings will tell
                log.warning("job %s: no answer from draftwire.draft.start in %gs", job.id, START_TIMEOUT_S)
                w.state = "running"
                return None
            w.state = "running"
            return start_outcome(msg.data, msg.headers, job.id)

    async def _ping(self, session: str) -> bool | None:
        """True: a draft runs the session; False: nobody does ("no responders"); None: no answer in time."""
        try:
            await self.nc.request(SUBJECTS.draft_session(session), b"", timeout=PING_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            return False
        except TimeoutError:
            return None
        return True

    async def _stored_result(self, w: Work) -> dict | None:
        job = w.record.job
        try:
            raw = await self.js.get_last_msg(DONE_STREAM, SUBJECTS.done(job.session))
        except nats.js.errors.NotFoundError:
            return None
        return draft_result(raw.data, raw.headers, job.id)

    async def _ack(self, w: Work) -> None:
        try:
            await w.msg.ack_sync(timeout=5)
        except Exception as exc:  # noqa: BLE001 - the reply is out; a redelivery finds the KV key and only acks
            log.warning("ack of job %s failed: %r", w.record.job.id, exc)
        w.acked = True
        w.state = "done"

    # --- cancel -------------------------------------------------------------------------------------------

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        now = time.time()
        self.cancels.add(request_id, now)
        mine = [w for w in self.work.values() if w.record.job.id == request_id]
        for w in mine:
            if self.cancels.applies(request_id, w.record.accepted_at, now):
                w.cancel()
        if not mine:
            task = asyncio.create_task(self._cancel_queued(request_id, now))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _cancel_queued(self, request_id: str, now: float) -> None:
        """A job nobody has fetched yet: the scheduler that deletes it from the stream answers `cancelled`."""
        try:
            raw = await self.js.get_last_msg(JOBS_STREAM, SUBJECTS.jobs(request_id))
            delivered = (await self.js.consumer_info(JOBS_STREAM, JOBS_CONSUMER)).delivered.stream_seq
            if raw.seq <= delivered:
                return  # handed to a scheduler already, which got this cancel too (or finds it remembered)
            record = JobRecord.decode(raw.data)
            if not self.cancels.applies(request_id, record.accepted_at, now):
                return
            await self.js.delete_msg(JOBS_STREAM, raw.seq)  # exactly one scheduler succeeds
        except (nats.js.errors.Error, nats.errors.Error, RequestError, TimeoutError, ValueError):
            return  # not there any more, another scheduler won, or JetStream is away: the holder decides
        log.info("job %s cancelled while queued", request_id)
        await self._deliver_once(record, _cancelled(request_id))

    # --- introspection ------------------------------------------------------------------------------------

    async def sessions_endpoint(self, req: Request) -> None:
        body = {
            "instance": self.instance,
            "sessions": sessions_snapshot(list(self.work.values()), time.monotonic(), time.time()),
        }
        await req.respond(json.dumps(body).encode())


def _cancelled(request_id: str) -> dict:
    return error_body("cancelled", "the request was cancelled", request_id)


async def _quietly(aw) -> None:
    """Best-effort acks: a closed connection must not turn cleanup into a crash."""
    try:
        await aw
    except Exception as exc:  # noqa: BLE001
        log.debug("best-effort ack failed: %r", exc)


def defaults_from_args(args) -> SpecParams:
    try:
        defaults = SpecParams(
            mode=args.default_mode,
            gamma=args.default_gamma,
            k=args.default_k,
            policy=args.default_policy,
            pipeline=args.default_pipeline,
        )
    except ParamError as exc:
        raise SystemExit(f"draftwire-scheduler: error: {exc}") from None
    if not args.request_timeout > 0:
        raise SystemExit("draftwire-scheduler: error: --request-timeout must be > 0")
    if args.max_inflight < 1:
        raise SystemExit("draftwire-scheduler: error: --max-inflight must be >= 1")
    return defaults


async def start(ctx: ServiceContext) -> Scheduler:
    args = ctx.args
    defaults = defaults_from_args(args)
    validate_token(ctx.instance, "instance")
    scheduler = Scheduler(ctx.nc, ctx.tracer, ctx.instance, defaults, args.request_timeout, args.max_inflight)
    await scheduler.start()
    ctx.cleanups.append(scheduler.stop)
    await register(  # last: a prompt is accepted only once everything that serves it is in place
        ctx,
        "draftwire-scheduler",
        "accepts prompts into the durable job queue and runs them on draft instances",
        [
            (SUBJECTS.prompts, scheduler.prompts_endpoint, "schedulers"),
            (SESSIONS_SUBJECT, scheduler.sessions_endpoint, "schedulers"),
            (f"{SESSIONS_SUBJECT}.{ctx.instance}", scheduler.sessions_endpoint, ctx.instance),
        ],
        metadata={
            "default_mode": defaults.mode,
            "default_gamma": str(defaults.gamma),
            "default_k": str(defaults.k),
            "default_policy": defaults.policy,
            "default_pipeline": str(defaults.pipeline).lower(),
            "request_timeout_s": f"{args.request_timeout:g}",
        },
    )
    # nats-py's flush() can send its PING ahead of still-queued SUBs, so "flushed" does not yet mean "others
    # can reach us"; our own request on the last endpoint is answered only once the server holds them all.
    await ctx.nc.request(f"{SESSIONS_SUBJECT}.{ctx.instance}", b"", timeout=5)
    ctx.ready_info["mode"] = defaults.mode
    log.info(
        "scheduling: default %s gamma=%d k=%d, timeout %gs, %d in flight",
        defaults.mode,
        defaults.gamma,
        defaults.k,
        args.request_timeout,
        args.max_inflight,
    )
    return scheduler


def main(argv: list[str] | None = None) -> None:
    run("scheduler", build_parser(), start, argv)


__all__ = [
    "RecentCancels",
    "Scheduler",
    "build_parser",
    "draft_result",
    "main",
    "start",
    "start_outcome",
]
