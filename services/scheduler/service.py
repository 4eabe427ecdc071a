"""Scheduler: takes prompts, stores each as a job in JetStream, runs it on a draft instance, replies once.

Intake. `draftwire.prompts` is a micro endpoint in queue group `schedulers`, so with no scheduler running a
request gets "no responders" at once. The handler parses and validates (bad input is answered at once),
gives the job a fresh session id and an absolute deadline, and stores it with its reply subject on
`draftwire.jobs.<id>` in DRAFTWIRE_JOBS, waiting for the PubAck; a second job with an id still in flight is
refused by the stream (one message per subject) and answered `duplicate_id`. A publish whose PubAck does not
come may have stored the job all the same: it is retried a few times with the same `Nats-Msg-Id:
job-<session>` (the stream stores it once), and if every try fails the handler claims the job's reply (the
delivered key, below) before it answers `unavailable`, so a job stored after all never answers too. The
handler never waits for a generation. Fire-and-forget prompts (`js.publish` to `draftwire.submit`, stream
DRAFTWIRE_SUBMIT) become jobs the same way, with no reply subject and a session id derived from the
submission's stream sequence, so a redelivered submission makes the same job and the jobs stream drops the
copy; their results and errors go to `draftwire.results.<id>` only.

Work. All schedulers pull from one durable consumer with a short ack_wait, send in-progress acks every
second while working, and hold at most `--max-inflight` jobs each. For a job: one whose reply was claimed
already is only acked; a result already in DRAFTWIRE_DONE is delivered; a draft still running the session
(its session subject answers) is followed; otherwise the job is placed: on the least-loaded draft instance
(its own `draftwire.draft.start.<instance>`), naming the least-loaded verifier in the job, from the loads
the instances report in their `$SRV.STATS` replies (gathered at most every half second; the jobs placed
meanwhile count towards them). With no draft reporting a load (older drafts) the job goes to the queue group
`draftwire.draft.start`, retried with backoff while no draft instance exists (`no_draft` at the deadline).
While it runs the scheduler pings the session every half second; "no responders" twice in a row (about a
second) means the draft died, and the same job (same session, resuming after the tokens the last ping
reported) is dispatched again. Every dispatch first looks for the result once more, so a draft that finished
just before its session went quiet is not run again. A scheduler killed mid-job stops heartbeating, and
JetStream hands the job to another one, which resumes it the same way. Past the deadline plus a grace with no
result: `deadline_exceeded`.

One reply. Before replying, a scheduler creates key `<session>` in the KV bucket DRAFTWIRE_DELIVERED; one
that cannot (the key exists) only acks. The reply goes to the stored reply subject and to
`draftwire.results.<id>`, then the ack deletes the job and frees the id. A scheduler killed between the
create and the publish loses that reply: at most one reply, never two. Publishing a reply never raises (the
micro endpoint would answer the exception with a second reply).

Cancel. `draftwire.cancel.<id>` ends a job that is queued or waiting for a draft at once (`cancelled`; a
queued job is answered through the delivered key, then deleted); a running job is stopped by its draft,
whose done message carries `cancelled` and the partial text (if none comes within a few seconds the
scheduler replies `cancelled` itself). Cancels are remembered for a while, so a job fetched after its cancel
is answered without running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

import msgpack
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import Request
from opentelemetry.trace import SpanKind, Status, StatusCode

from draftwire.shared.core.backoff import Backoff
from draftwire.shared.core.params import (
    DEFAULT_GAMMA,
    DEFAULT_K,
    DEFAULT_MODE,
    DEFAULT_POLICY,
    MODES,
    POLICIES,
    ParamError,
    SpecParams,
)
from draftwire.shared.core.placement import draft_load, verifier_load
from draftwire.shared.core.prompt_request import (
    REPLY_CONTENT_TYPES,
    SESSION_ID_HEX,
    GenerateJob,
    JobRecord,
    PromptRequest,
    RequestError,
    build_job,
    encode_reply,
    error_body,
    parse_prompt,
)
from draftwire.shared.io import bus
from draftwire.shared.io.bus import (
    DONE_STREAM,
    DRAFT_PREFIX,
    JOBS_CONSUMER,
    JOBS_STREAM,
    ROOT,
    SERVICE_ERROR_HEADER,
    SUBJECTS,
    SUBMIT_STREAM,
    ensure_delivered_bucket,
    ensure_done_stream,
    ensure_jobs_stream,
    ensure_submit_stream,
    extract_context,
    inject_headers,
    jobs_subscription,
    scoped_id,
    submit_subscription,
    tenant_of,
    validate_token,
)
from draftwire.shared.io.loads import LoadBoard
from draftwire.shared.io.service_shell import (
    ServiceContext,
    env,
    env_float,
    env_int,
    register,
    run,
    service_parser,
)

log = logging.getLogger("draftwire.scheduler")

SESSIONS_SUBJECT = f"{ROOT}.scheduler.sessions"
HEARTBEAT_S = 1.0  # in-progress acks while working, well inside bus.JOBS_ACK_WAIT_S
FETCH_S = 1.0  # one pull request's lifetime
PUBLISH_TIMEOUT_S = 2.0  # waiting for a PubAck
STORE_TRIES = 3  # publishes of one job (same Nats-Msg-Id, so JetStream stores it once) before giving up
STORE_LEADERLESS_S = 15.0  # "no responders" from the jobs stream (no leader: an election) is retried this long
START_TIMEOUT_S = 5.0  # the draft answers `draftwire.draft.start` at once; longer means it may not have it
PING_S = 0.5  # liveness pings of the session subject while the draft runs it
PING_TIMEOUT_S = 0.5
DEAD_AFTER = 2  # consecutive "no responders" before the job is dispatched again
DEADLINE_GRACE_S = 3.0  # the draft enforces the deadline and reports; this long after it we answer ourselves
CANCEL_GRACE_S = 3.0  # a running job's draft reports its cancel (with the partial text) within this
CLOCK_SLACK_S = 1.0  # a cancel applies to jobs accepted up to this long after it (clocks of two hosts)
DELIVERED_MARGIN_S = 15 * 60.0
LOADS_TTL_S = 0.5  # instance loads are gathered again when older than this (a burst of jobs shares one)
LOADS_WINDOW_S = 0.1  # waiting for the instances' $SRV.STATS replies (those seen last time end it sooner)
LOADS_QUIET_S = 0.02  # once they answered, further replies are taken until none came for this long
DRAFT_SERVICE = "draftwire-draft"
VERIFIER_SERVICE = "draftwire-verifier"
JS_LIMIT_EXCEEDED = 10077  # a stream refused a message: per subject (a duplicate id) or in total (full)


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
        default=env_int("MAX_INFLIGHT", 64),
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


def job_msg_id(session: str) -> str:
    """The jobs stream's dedupe key: every publish of one job carries it, so JetStream stores the job once."""
    return f"job-{session}"


def submission_session(stream_seq: int, stored_at: datetime) -> str:
    """The session id of the job made from one fire-and-forget submission, the same at every delivery.

    A redelivered submission (its ack was lost, or its scheduler died after storing the job) thus makes the
    same job: the jobs stream drops it as a duplicate (same `job-<session>` message id), and past the dedupe
    window the delivered key and the stored result still name it. The stored time keeps a recreated stream,
    whose sequence numbers start over, from reusing the ids of an old one.
    """
    key = f"{SUBMIT_STREAM}:{stream_seq}:{stored_at.isoformat()}"
    return hashlib.sha256(key.encode()).hexdigest()[:SESSION_ID_HEX]


def store_refusal(exc: nats.js.errors.APIError, request_id: str) -> dict:
    """The body for a job JetStream refused to store (the refusal is an answer: nothing was stored)."""
    if exc.err_code == JS_LIMIT_EXCEEDED and "per subject" in (exc.description or ""):
        message = f"a request with id {request_id!r} is in flight; wait for its result or use another id"
        return error_body("duplicate_id", message, request_id)
    if exc.err_code == JS_LIMIT_EXCEEDED:
        return error_body("overloaded", "the job queue is full; retry later", request_id)
    return error_body("unavailable", f"could not store the job: {exc.description or exc!r}", request_id)


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
    progress: tuple[int, ...] = ()  # tokens the draft running it had committed at its last session ping
    prefix: str = ""  # the subjects of the draft's device that runs it (`Subjects.device_prefix`), once known

    def cancel(self) -> None:
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        self.cancel_event.set()


def session_progress(data: bytes, max_new_tokens: int) -> tuple[int, ...] | None:
    """The committed tokens in a draft's session-ping answer; None when the answer carries none usable."""
    try:
        generated = msgpack.unpackb(data, raw=False).get("generated")
    except Exception:  # noqa: BLE001 - msgpack raises a zoo; an unreadable answer just carries no progress
        return None
    if not isinstance(generated, list) or len(generated) > max_new_tokens:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in generated):
        return None
    return tuple(generated)


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
        board = {"ttl": LOADS_TTL_S, "window": LOADS_WINDOW_S, "quiet": LOADS_QUIET_S}
        self.drafts = LoadBoard(nc, DRAFT_SERVICE, draft_load, **board)
        self.verifiers = LoadBoard(nc, VERIFIER_SERVICE, verifier_load, **board)

    async def start(self) -> None:
        await ensure_jobs_stream(self.js)
        await ensure_submit_stream(self.js)
        await ensure_done_stream(self.js)
        self.delivered = await ensure_delivered_bucket(self.js, ttl=2 * self.timeout + DELIVERED_MARGIN_S)
        jobs, submits = await jobs_subscription(self.js), await submit_subscription(self.js)
        self._subs = [jobs, submits, await self.nc.subscribe(SUBJECTS.cancel_all, cb=self._on_cancel),
                      await self.nc.subscribe(SUBJECTS.dev_chunks_all, cb=self._relay_chunk)]
        self._tasks = [
            asyncio.create_task(
                self._fetch_loop(jobs, self._admit, what="jobs", slots=self.slots), name="scheduler-jobs"
            ),
            asyncio.create_task(
                self._fetch_loop(submits, self._take_submission, what="submissions", batch=16),
                name="scheduler-submit",
            ),
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
        tenant = tenant_of(req.subject, SUBJECTS.prompts)  # only that client may publish there
        try:
            parsed, fmt = parse_prompt(req.data, headers)
        except RequestError as exc:
            body = error_body(exc.code, str(exc), exc.request_id)
            await self._refuse(body, exc.format or "json", reply, exc.request_id, tenant)
            return
        record = self._record(parsed, fmt, reply, tenant=tenant)
        body, maybe_stored = await self._store(record, headers)
        if body is None:
            return
        if maybe_stored and not await self._claim_quietly(record.job):
            return  # the job may be stored after all, and it is (or will be) its scheduler's to answer
        # duplicate_id goes to the requester only: results.<id> belongs to the job already running
        duplicate = body["error"]["code"] == "duplicate_id"
        await self._refuse(body, fmt, reply, None if duplicate else parsed.id, tenant)

    def _record(
        self, req: PromptRequest, fmt: str, reply: str | None, session: str | None = None, tenant: str = ""
    ) -> JobRecord:
        """The job record for an accepted request; `session` pins the session id (else a fresh one)."""
        now = time.time()
        pinned = {} if session is None else {"new_session": lambda: session}
        job = build_job(req, fmt, self.defaults, now=now, max_timeout=self.timeout, tenant=tenant, **pinned)
        return JobRecord(job, reply, now)

    async def _store(self, record: JobRecord, headers: Mapping[str, str]) -> tuple[dict | None, bool]:
        """Store the job: (None, True) once JetStream confirmed it, else (the error body, whether it may be
        stored all the same).

        A publish whose PubAck did not come may have stored the job all the same, so it is tried again with
        the same `Nats-Msg-Id` (JetStream stores one job whatever the number of tries), STORE_TRIES times
        at most. "Maybe stored" tells the caller that the job could still run and answer.
        """
        job = record.job
        # the worker's span joins the user's trace
        msg_headers = inject_headers({"Nats-Msg-Id": job_msg_id(job.session)}, extract_context(headers))
        maybe_stored, failure = False, ""
        backoff = Backoff(initial=0.1, cap=1.0)
        tries, leaderless_until = 0, time.monotonic() + STORE_LEADERLESS_S
        while tries < STORE_TRIES:
            if tries or failure:
                await asyncio.sleep(backoff.next())
            try:
                await self.js.publish(
                    SUBJECTS.jobs(job.id, job.tenant), record.encode(), timeout=PUBLISH_TIMEOUT_S,
                    headers=msg_headers,
                )
                return None, True
            except nats.js.errors.APIError as exc:  # an answer: this try stored nothing
                return store_refusal(exc, job.id), maybe_stored
            except nats.js.errors.NoStreamResponseError as exc:  # nobody took the message: the stream has no
                failure = repr(exc)  # leader (a cluster elects one within seconds of a node's loss): wait for it
                tries = tries if time.monotonic() < leaderless_until else STORE_TRIES
            except (TimeoutError, nats.errors.Error) as exc:  # it may have been stored
                maybe_stored, failure, tries = True, repr(exc), tries + 1
            log.warning("job %s: storing it failed (try %d of %d): %s", job.id, tries, STORE_TRIES, failure)
        return error_body("unavailable", f"could not store the job: {failure}", job.id), maybe_stored

    async def _take_submission(self, msg: Msg) -> None:
        """A fire-and-forget prompt becomes a job; acked once stored or answered, kept while jobs are full.

        The job's session comes from the submission's place in its stream, so a redelivered submission
        makes the same job, which the jobs stream then stores once (see `submission_session`).
        """
        headers = msg.headers or {}
        try:
            tenant = tenant_of(msg.subject, SUBJECTS.submit)
        except ValueError:  # the stream takes only submit and submit.<token>: not reachable
            log.warning("dropping a submission on %s", msg.subject)
            await _quietly(msg.ack())
            return
        try:
            req, fmt = parse_prompt(msg.data, headers)
        except RequestError as exc:
            if exc.request_id is None:
                log.warning("dropping a submission nobody can be told about: %s: %s", exc.code, exc)
            await self._refuse(
                error_body(exc.code, str(exc), exc.request_id), exc.format or "json", None, exc.request_id, tenant
            )
            await _quietly(msg.ack())
            return
        meta = msg.metadata
        record = self._record(req, fmt, None, submission_session(meta.sequence.stream, meta.timestamp), tenant)
        body, _ = await self._store(record, headers)  # maybe stored: the retry is deduplicated
        if body is None:
            await _quietly(msg.ack())
        elif body["error"]["code"] == "duplicate_id":
            log.warning("dropping submission %s: a request with that id is in flight", req.id)
            await _quietly(msg.ack())
        else:
            log.warning("submission %s not stored yet (%s); retrying", req.id, body["error"]["message"])
            await _quietly(msg.nak(delay=1.0))

    async def _refuse(self, body: dict, fmt: str, reply: str | None, request_id: str | None, tenant: str):
        """Answer a request this scheduler refused, and tell telemetry (a draft reports the other outcomes)."""
        await self._answer(body, fmt, reply, request_id, tenant)
        event = {"type": "request", "rejected": True, "request_id": request_id or "",
                 "error": body["error"]["code"], "ts": time.time()}
        with contextlib.suppress(Exception):  # best effort, as every event
            await self.nc.publish(SUBJECTS.events_request, msgpack.packb(event))

    async def _answer(
        self, body: dict, fmt: str, reply: str | None, request_id: str | None, tenant: str = ""
    ) -> None:
        """Publish a reply to the requester (if any) and to its tenant's `results.<id>` (if the id is known).

        Never raises: it runs inside the micro handler, which would answer an exception with a second reply
        (a 500) to the same inbox, and after the delivered key, where a retry must not follow either.
        """
        try:
            data = encode_reply(body, fmt)
            if len(data) > self.nc.max_payload:
                message = f"result is {len(data)} bytes, over the server's max_payload {self.nc.max_payload}"
                data = encode_reply(error_body("oversize", message, request_id), fmt)
            headers = {"Content-Type": REPLY_CONTENT_TYPES[fmt]}
            subjects = [s for s in (reply, request_id and SUBJECTS.results(request_id, tenant)) if s]
        except Exception:  # nobody can be answered with what we cannot encode
            log.exception("could not encode the reply to request %s", request_id)
            return
        for subject in subjects:
            try:
                await bus.publish(self.nc, subject, data, headers)
            except Exception as exc:  # noqa: BLE001 - a closed or slow connection: this copy is lost
                log.warning("could not publish the reply to request %s on %s: %r", request_id, subject, exc)

    async def _claim(self, job: GenerateJob) -> bool:
        """Create the delivered key `<session>`: True for the one scheduler that may answer the job, False
        for every other (the key exists). Other errors (JetStream away) raise: nobody may answer yet."""
        try:
            await self.delivered.create(job.session, self.instance.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("job %s (session %s) was answered already; not replying again", job.id, job.session)
            return False
        return True

    async def _claim_quietly(self, job: GenerateJob) -> bool:
        try:
            return await self._claim(job)
        except Exception as exc:  # noqa: BLE001 - at most one reply: unsure means no reply
            log.error("job %s: could not claim its reply (%r); not answering", job.id, exc)
            return False

    async def _deliver_once(self, record: JobRecord, body: dict) -> bool:
        """Reply unless another scheduler already did for this session (the KV create decides)."""
        if not await self._claim(record.job):
            return False
        await self._answer(body, record.job.format, record.reply, record.job.id, record.job.tenant)
        return True

    async def _answered(self, job: GenerateJob) -> bool:
        """Whether the job's reply was claimed already (by the intake that gave up storing it, or by an
        earlier holder): such a job is acked without running. Unsure means no: the claim decides later."""
        try:
            await self.delivered.get(job.session)
        except Exception:  # noqa: BLE001 - KeyNotFoundError, or JetStream away
            return False
        return True

    # --- work ---------------------------------------------------------------------------------------------

    async def _fetch_loop(self, sub, handle, *, what: str, batch: int = 1, slots=None) -> None:
        """Pull messages and hand each to `handle` until stopped. With `slots` (then batch 1), a slot is taken
        before each fetch and a fetched message owns it (its handler releases it)."""
        while not self.stopping:
            if slots is not None:
                await slots.acquire()
            try:
                msgs = await sub.fetch(batch, timeout=FETCH_S)
            except BaseException as exc:
                if slots is not None:
                    slots.release()
                if isinstance(exc, TimeoutError):
                    continue
                if not isinstance(exc, Exception):  # cancelled: stop
                    raise
                log.warning("fetching %s failed: %r; retrying", what, exc)  # reconnects, consumer errors
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await handle(msg)

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
        if self.cancels.applies(scoped_id(record.job.id, record.job.tenant), record.accepted_at, time.time()):
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
                if await self._answered(job):  # say the intake gave up storing it, and answered for it
                    log.info("job %s (session %s) was answered already; acking it unrun", job.id, job.session)
                    span.set_attribute("draftwire.answered_already", True)
                else:
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

    def _unless_stopping(self) -> None:
        """Leave a job's loop once the scheduler stops, even if its cancellation was lost: on Python 3.11
        `asyncio.wait_for` (here and inside nats-py's requests) can swallow a cancel that lands as its timeout
        fires, and the loop would then run on, holding `stop()` forever."""
        if self.stopping:
            raise asyncio.CancelledError

    async def _heartbeat(self, w: Work) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await _quietly(w.msg.in_progress())

    async def _outcome(self, w: Work) -> dict:
        """The body to reply with: a stored result, the result of a draft still running it, or a new run."""
        job = w.record.job
        done = await self.nc.subscribe(SUBJECTS.done(job.session))  # before any dispatch: no result slips by
        try:
            if (body := await self._finished(w, done)) is not None:
                return body
            if await self._ping(w):  # a cancel of a running job is its draft's to report
                log.info("job %s: attaching to the draft still running session %s", job.id, job.session)
                w.state = "running"
            elif w.cancelled_at is not None:
                return _cancelled(job.id)
            elif time.time() > job.deadline:
                return error_body("deadline_exceeded", "the deadline passed before the job ran", job.id)
            elif (body := await self._dispatch(w, done)) is not None:
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
            self._unless_stopping()
            with contextlib.suppress(nats.errors.TimeoutError):
                msg = await done.next_msg(timeout=PING_S)
                return draft_result(msg.data, msg.headers, job.id)
            if w.cancelled_at is not None and time.monotonic() - w.cancelled_at > CANCEL_GRACE_S:
                return _cancelled(job.id)
            if time.time() > job.deadline + DEADLINE_GRACE_S:
                return error_body("deadline_exceeded", "no result from the draft by the deadline", job.id)
            alive = await self._ping(w)
            misses = misses + 1 if alive is False else 0
            if misses < DEAD_AFTER:
                continue
            log.warning(
                "job %s: the draft running session %s stopped answering; dispatching again after %d tokens",
                job.id,
                job.session,
                len(w.progress),
            )
            w.record = replace(w.record, job=replace(job, resume=w.progress))
            if (body := await self._dispatch(w, done)) is not None:
                return body
            misses = 0

    async def _dispatch(self, w: Work, done) -> dict | None:
        """Hand the job to a draft instance; None once one took it, else the body to reply with.

        First a last look for the result: a draft that finished just before its session stopped answering
        (the ping that found "no responders") has published it, and running the job again would waste a
        generation.
        """
        if (body := await self._finished(w, done)) is not None:
            return body
        job = w.record.job
        backoff = Backoff(initial=0.1, cap=1.0)
        gone: set[str] = set()  # drafts that reported a load but whose own start subject had no responders
        while True:
            self._unless_stopping()
            if w.cancelled_at is not None:
                return _cancelled(job.id)
            if time.time() > job.deadline:
                return error_body("no_draft", "no draft instance took the job before its deadline", job.id)
            subject, payload, draft, prefix = await self._place(job, gone)
            if w.state != "waiting_for_draft":  # a retry of a waiting job still waits, as the listing says
                w.state = "dispatching"
            try:
                msg = await bus.request(self.nc, subject, payload, timeout=START_TIMEOUT_S)
            except nats.errors.NoRespondersError:
                if draft is not None:  # stopped since it reported: place the job again without it
                    gone.add(draft)
                    self.drafts.forget(draft)
                    continue
                w.state = "waiting_for_draft"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(w.cancel_event.wait(), backoff.next())
                continue
            except TimeoutError:  # a draft may have taken it after all: the liveness pings will tell
                log.warning("job %s: no answer from %s in %gs", job.id, subject, START_TIMEOUT_S)
                w.state = "running"
                return None
            w.state = "running"
            w.prefix = prefix
            if w.cancelled_at is not None:  # cancelled while it was being placed
                await self._forward_cancel(w)
            return start_outcome(msg.data, msg.headers, job.id)

    async def _place(self, job: GenerateJob, gone: set[str]) -> tuple[str, bytes, str | None, str]:
        """Where the job goes: (subject, payload, the draft instance addressed or None, its device's prefix).

        The least-loaded draft that reports its load gets the job on its own start subject, with the
        least-loaded verifier that reports one named in it. A draft of unknown load (an older one, which
        serves neither its own subject nor knows the job's `verifier` field) and no draft at all mean the
        queue group and the job as stored. A placement counts at once: the jobs dispatched meanwhile see it.
        """
        draft, verifier = await asyncio.gather(self.drafts.choose(gone), self.verifiers.choose())
        if draft is None or draft.key is None:
            return SUBJECTS.draft_start, job.encode(), None, DRAFT_PREFIX
        self.drafts.placed(draft.instance)
        if verifier is not None and verifier.key is not None:
            job = replace(job, verifier=verifier.instance)
            self.verifiers.placed(verifier.instance)
        log.debug("job %s: placed on draft %s, verifier %s", job.id, draft.instance, job.verifier)
        prefix = self._device_prefix(draft.instance)
        return SUBJECTS.draft_start_instance(draft.instance, prefix), job.encode(), draft.instance, prefix

    def _device_prefix(self, instance: str) -> str:
        """The subjects of a draft instance's device identity, from its reported stats (unsecured: none)."""
        reported = self.drafts.reported.get(instance)
        device = reported.data.get("device") if reported is not None and isinstance(reported.data, dict) else None
        try:
            return SUBJECTS.device_prefix(device if isinstance(device, str) else None)
        except ValueError:
            return DRAFT_PREFIX

    def _known_prefixes(self) -> list[str]:
        """Every device's subjects a session could be running under (for a job this scheduler did not place)."""
        return sorted({DRAFT_PREFIX, *(self._device_prefix(i) for i in self.drafts.reported)})

    async def _finished(self, w: Work, done) -> dict | None:
        """The session's result if there is one already: a done message received, or one stored."""
        if done.pending_msgs:
            msg = await done.next_msg(timeout=0.1)
            return draft_result(msg.data, msg.headers, w.record.job.id)
        return await self._stored_result(w)

    async def _ping(self, w: Work) -> bool | None:
        """True: a draft runs the session; False: nobody does ("no responders"); None: no answer in time.

        A live draft's answer carries the tokens it has committed, kept in `w.progress` so that a job whose
        draft dies resumes after them rather than starting over.
        """
        answer: bool | None = False
        for prefix in [w.prefix] if w.prefix else self._known_prefixes():
            try:
                msg = await self.nc.request(
                    SUBJECTS.draft_session(w.record.job.session, prefix), b"", timeout=PING_TIMEOUT_S
                )
            except nats.errors.NoRespondersError:
                continue
            except TimeoutError:
                answer = None
                continue
            w.progress = session_progress(msg.data, w.record.job.params.max_new_tokens) or w.progress
            w.prefix = prefix
            return True
        return answer

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
        """`cancel.<id>` or `cancel.<tenant>.<id>`: remembered under that scoped id (`<id>`, `<tenant>.<id>`)."""
        scoped = msg.subject.removeprefix(SUBJECTS.cancel_all.removesuffix(">"))
        if not 1 <= scoped.count(".") + 1 <= 2:
            return
        now = time.time()
        self.cancels.add(scoped, now)
        mine = [w for w in self.work.values() if scoped_id(w.record.job.id, w.record.job.tenant) == scoped]
        for w in mine:
            if self.cancels.applies(scoped, w.record.accepted_at, now):
                w.cancel()
                await self._forward_cancel(w)
        if not mine:
            task = asyncio.create_task(self._cancel_queued(scoped, now))
            self._side_tasks.add(task)
            task.add_done_callback(self._side_tasks.discard)

    async def _forward_cancel(self, w: Work) -> None:
        """A secured draft hears cancels only on its own subjects: pass the tenant's cancel on to it."""
        if w.prefix and w.prefix != DRAFT_PREFIX:
            with contextlib.suppress(Exception):
                await self.nc.publish(SUBJECTS.draft_cancel(w.record.job.session, w.prefix), b"")

    async def _relay_chunk(self, msg: Msg) -> None:
        """A secured draft's stream chunk, passed on to its tenant's stream subject, and only when it comes
        from the device running that session (a chunk under any other device's prefix is dropped)."""
        prefix, _, session = msg.subject.rpartition(".chunk.")
        for w in self.work.values():
            job = w.record.job
            if job.session == session and w.prefix == prefix:
                with contextlib.suppress(Exception):
                    await self.nc.publish(SUBJECTS.stream(job.id, job.tenant), msg.data, headers=msg.headers)
                return

    async def _cancel_queued(self, scoped: str, now: float) -> None:
        """A job nobody has fetched yet: whoever claims its reply answers `cancelled`, then deletes the job.

        Answer first: a job deleted unanswered would be lost if the answer failed, while a job answered but
        not deleted (say JetStream went away) is fetched later, remembered as cancelled, and only acked.
        """
        try:
            tenant, _, request_id = scoped.rpartition(".")
            raw = await self.js.get_last_msg(JOBS_STREAM, SUBJECTS.jobs(request_id, tenant))
            delivered = (await self.js.consumer_info(JOBS_STREAM, JOBS_CONSUMER)).delivered.stream_seq
            if raw.seq <= delivered:
                return  # handed to a scheduler already, which got this cancel too (or finds it remembered)
            record = JobRecord.decode(raw.data)
            if not self.cancels.applies(scoped, record.accepted_at, now):
                return
            if not await self._deliver_once(record, _cancelled(request_id)):
                return  # another scheduler answered it
            log.info("job %s cancelled while queued", request_id)
            await self.js.delete_msg(JOBS_STREAM, raw.seq)
        except (nats.js.errors.NotFoundError, RequestError, ValueError):
            return  # not there any more, or not a job we can read: the holder decides
        except Exception as exc:  # noqa: BLE001 - JetStream away: a job still queued is answered when fetched
            log.warning("cancelling queued job %s: %r", scoped, exc)

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
            (SUBJECTS.prompts_tenants, scheduler.prompts_endpoint, "schedulers"),  # one subject per tenant
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
