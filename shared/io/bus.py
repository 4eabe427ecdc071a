"""NATS helpers every draftwire service uses: subjects, connect, trace-carrying messages, JetStream, micro.

All internal subjects live under `draftwire.>` and are built here, so a typo cannot silently create a
subject nobody listens on, and ids are validated before they become subject tokens.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from draftwire.shared.core.backoff import Backoff
from draftwire.shared.core.subject_names import (
    DELIVERED_BUCKET,
    DONE_STREAM,
    JOBS_STREAM,
    ROOT,
    SUBMIT_STREAM,
    VOCAB_BUCKET,
    validate_token,
)
from draftwire.shared.io.credentials import load_identity
from draftwire.shared.io.nats_server import is_reachable, split_urls

log = logging.getLogger(__name__)

DRAFT_PREFIX = f"{ROOT}.draft"  # the unsecured drafts' subjects (`Subjects.device_prefix`)
JOBS_CONSUMER = "DRAFTWIRE_SCHEDULER"
SUBMIT_CONSUMER = "DRAFTWIRE_SUBMIT_INTAKE"
VERIFY_QUEUE = "verifiers"
INSTANCE_HEADER = "Draftwire-Instance"  # verifier replies name their instance: the device sticks to it
SERVICE_ERROR_HEADER = "Nats-Service-Error"  # nats.micro's error reply (with Nats-Service-Error-Code)


@dataclass(frozen=True)
class Subjects:
    """The subject map. Fixed subjects are fields; per-id subjects are methods that validate the id.

    Client-facing subjects come in two shapes: the shared ones of an unsecured deployment
    (`prompts`, `results.<id>`, ...) and a tenant's own (`prompts.<tenant>`, `results.<tenant>.<id>`, ...),
    which only that client identity may use (`draftwire.shared.core.nats_permissions`). `tenant=""` is the shared shape.
    """

    prompts: str = f"{ROOT}.prompts"  # micro endpoint, queue group `schedulers` (request/reply)
    prompts_tenants: str = f"{ROOT}.prompts.*"  # the same, one subject per tenant (the token names it)
    submit: str = f"{ROOT}.submit"  # JetStream, fire-and-forget; results on `results.<id>`
    submit_tenants: str = f"{ROOT}.submit.*"
    cancel_all: str = f"{ROOT}.cancel.>"
    jobs_all: str = f"{ROOT}.jobs.>"  # internal: accepted jobs, one per (tenant, request id) in flight
    done_all: str = f"{ROOT}.done.*"  # internal: each session's final result, kept for a new scheduler
    verify: str = f"{ROOT}.verify"
    verifier_info: str = f"{ROOT}.verifier.info"
    sessions_close: str = f"{ROOT}.sessions.close"
    draft_start: str = f"{ROOT}.draft.start"  # queue group `drafts`; each also serves draft_start_instance
    events_round: str = f"{ROOT}.events.round"
    events_request: str = f"{ROOT}.events.request"
    events_all: str = f"{ROOT}.events.>"

    def prompts_for(self, tenant: str = "") -> str:
        return f"{ROOT}.prompts.{validate_token(tenant, 'tenant')}" if tenant else self.prompts

    def submit_for(self, tenant: str = "") -> str:
        return f"{ROOT}.submit.{validate_token(tenant, 'tenant')}" if tenant else self.submit

    def stream(self, request_id: str, tenant: str = "") -> str:
        return f"{ROOT}.stream.{scoped_id(request_id, tenant)}"

    def results(self, request_id: str, tenant: str = "") -> str:
        """Every final result or error of a prompt, for publishers that sent it without a reply subject."""
        return f"{ROOT}.results.{scoped_id(request_id, tenant)}"

    def cancel(self, request_id: str, tenant: str = "") -> str:
        """Publish anything here to cancel request `request_id` (queued or running)."""
        return f"{ROOT}.cancel.{scoped_id(request_id, tenant)}"

    def jobs(self, request_id: str, tenant: str = "") -> str:
        return f"{ROOT}.jobs.{scoped_id(request_id, tenant)}"

    def done(self, session: str) -> str:
        return f"{ROOT}.done.{validate_token(session, 'session id')}"

    def device_prefix(self, device: str | None = None) -> str:
        """Where a draft instance takes its jobs, session pings and cancels, and sends its stream chunks:
        `draftwire.draft` unsecured, else its device identity's own `draftwire.dev.<device>`, which no other
        device may read or write (so no device learns another's sessions or speaks for them)."""
        return f"{ROOT}.dev.{validate_token(device, 'device')}" if device else DRAFT_PREFIX

    def draft_session(self, session: str, prefix: str = "") -> str:
        """Held by the one draft instance running `session`: "no responders" here means nobody runs it."""
        return f"{prefix or DRAFT_PREFIX}.session.{validate_token(session, 'session id')}"

    def draft_start_instance(self, instance: str, prefix: str = "") -> str:
        """One draft instance's own start subject: the scheduler sends a job here to place it on that instance
        (`draft_start`, queue group `drafts`, takes a job any unsecured instance may run)."""
        return f"{prefix or DRAFT_PREFIX}.start.{validate_token(instance, 'draft instance')}"

    def draft_cancel(self, session: str, prefix: str) -> str:
        """A secured draft's cancel of `session` (the scheduler forwards the tenant's `cancel.<tenant>.<id>`)."""
        return f"{prefix}.cancel.{validate_token(session, 'session id')}"

    def draft_chunks(self, session: str, prefix: str) -> str:
        """A secured draft's stream chunks of `session`; the scheduler holding the job relays them to the
        tenant's `stream.<tenant>.<id>` (a device never publishes on a tenant's subjects itself)."""
        return f"{prefix}.chunk.{validate_token(session, 'session id')}"

    dev_chunks_all: str = f"{ROOT}.dev.*.chunk.*"

    def verify_instance(self, instance: str) -> str:
        return f"{ROOT}.verify.{validate_token(instance, 'verifier instance')}"


def scoped_id(request_id: str, tenant: str = "") -> str:
    """`<id>` or `<tenant>.<id>`: a request id is unique within its tenant only (the tail of its job, result,
    stream and cancel subjects, and how a cancel names it)."""
    rid = validate_token(request_id, "request id")
    return f"{validate_token(tenant, 'tenant')}.{rid}" if tenant else rid


def tenant_of(subject: str, shared: str) -> str:
    """The tenant a client subject belongs to: "" for `shared` itself, else the token after it."""
    return "" if subject == shared else validate_token(subject.removeprefix(f"{shared}."), "tenant")


SUBJECTS = Subjects()


# --- connection -------------------------------------------------------------------------------------------


async def _log_error(exc: Exception) -> None:
    # nats-py's default callback logs a full traceback for every failed (re)connect attempt.
    log.warning("NATS client error: %s", exc or type(exc).__name__)


class _TlsCloseNoise(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time a TLS peer
    closes a connection nats-py reads: harmless, and it would drown real warnings on every shutdown."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_TlsCloseNoise())


RECONNECT_WAIT_S = 0.5  # before dialling a server tried this recently again (others in the list go at once)
PING_INTERVAL_S = 5.0  # a node that vanished without closing (host down, partition) is noticed within
MAX_OUTSTANDING_PINGS = 3  # PING_INTERVAL_S x this (15 s), then the client moves to another node


async def connect(
    url: str | Sequence[str], name: str, *, initial_timeout: float = 5.0,
    creds: str | os.PathLike[str] | None = None, **kw
) -> Client:
    """Connect to one server or a cluster (`url`: `URL1,URL2,...` or a list), with a bounded first attempt,
    then reconnect forever.

    nats-py retries the *initial* connect too (60 x 2 s by default, forever with max_reconnect_attempts=-1),
    so a missing server would hang a service for minutes. We bound the first connect with
    `initial_timeout` and raise ConnectionError; once connected, the client reconnects indefinitely, to
    whichever server of the list (or of those the cluster advertised since) answers, so neither a restarted
    server nor a cluster node's loss takes the services down: what they published meanwhile is buffered and
    sent on reconnect, and their subscriptions are made again. `creds` is an identity's nkey seed file
    (`draftwire.shared.io.credentials`): the client signs in as it and uses its own inbox prefix. `kw`
    overrides any nats.connect option (`tls=` an ssl.SSLContext, for instance).
    """
    try:
        servers = split_urls(url)
    except ValueError as exc:
        raise ConnectionError(str(exc)) from None
    if creds is not None:
        try:
            kw = {**load_identity(creds).connect_options(), **kw}
        except ValueError as exc:
            raise ConnectionError(str(exc)) from None
    opts: dict = {
        "name": name,
        "connect_timeout": 2,
        "allow_reconnect": True,
        "reconnect_time_wait": RECONNECT_WAIT_S,
        "max_reconnect_attempts": -1,
        "ping_interval": PING_INTERVAL_S,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "error_cb": _log_error,
        **kw,
    }
    where = ", ".join(servers)
    reachable = await asyncio.gather(*(is_reachable(u, timeout=min(initial_timeout, 2.0)) for u in servers))
    if not any(reachable):
        raise ConnectionError(
            f"NATS server at {where} is not reachable (is it running? `draftwire up` starts one)"
        )
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(servers=servers, **opts), initial_timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        cause = nc.last_error or exc
        await nc.close()
        hint = ""
        if any(s in repr(cause) for s in ("Authorization Violation", "CERTIFICATE_VERIFY_FAILED", "tls")):
            hint = " (a secured server: pass your identity with --creds and its CA with --tls-ca)"
        raise ConnectionError(
            f"could not connect to NATS at {where} within {initial_timeout}s: {cause!r}{hint}"
        ) from exc
    return nc


async def flush(nc: Client, timeout: float = 10.0) -> None:
    """Return once the server has processed everything this client sent before, subscriptions included.

    nats-py's `Client.flush()` writes its PING straight to the socket, ahead of SUB/UNSUB/PUB commands still in
    its pending buffer, so its PONG can come back before the server has seen a subscription made just before
    (another client's request then meets "no responders"; seen ~6% of the time on loopback). Pushing the
    pending buffer through nats-py's flusher first puts the PING behind them, and the server answers in order.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout)


# --- trace context in headers -----------------------------------------------------------------------------


class _CaseInsensitiveGetter(Getter[Mapping[str, str]]):
    """NATS headers are case-preserving; other clients may send `Traceparent`, so match case-insensitively."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        if key in carrier:
            return [carrier[key]]
        low = key.lower()
        for k, v in carrier.items():
            if k.lower() == low:
                return [v]
        return None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _CaseInsensitiveGetter()


def inject_headers(headers: dict[str, str] | None = None, context: Context | None = None) -> dict[str, str]:
    """Return `headers` plus W3C traceparent/tracestate (and baggage) for the current (or given) context."""
    out = dict(headers or {})
    propagate.inject(out, context=context)
    return out


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The remote parent context carried by a message's headers (an empty context when there is none)."""
    return propagate.extract(headers or {}, getter=_GETTER)


async def request(
    nc: Client, subject: str, payload: bytes, timeout: float, headers: dict[str, str] | None = None
) -> Msg:
    """nc.request that carries the current span context, so the responder's span joins the same trace."""
    return await nc.request(subject, payload, timeout=timeout, headers=inject_headers(headers))


async def publish(nc: Client, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
    """nc.publish that carries the current span context."""
    await nc.publish(subject, payload, headers=inject_headers(headers))


# --- JetStream: jobs, fire-and-forget submissions, results, deliveries -----------------------------------
#
# Every create is idempotent and updates a stream whose editable settings changed, so each service can ensure
# what it uses at start, in any order.
#
# Every stream is bounded in messages, bytes, age, messages per subject and bytes per message (headers
# included), so no publisher can grow the server's store without limit. tests/test_stream_limits.py checks
# these against the request limits of shared/core/prompt_request.py.

JOBS_MAX_AGE_S = 24 * 3600.0  # far beyond any request timeout: a job leaves the queue by its ack, not by age
JOBS_ACK_WAIT_S = 4.0  # a job goes to another scheduler this long after its holder stopped heartbeating
JOBS_MAX_ACK_PENDING = 1024  # jobs in flight across all schedulers
JOBS_DUPLICATE_WINDOW_S = 120.0  # a job publish retried (same Nats-Msg-Id) within this is stored once
JOBS_MAX_MSGS = 100_000  # jobs queued or running: hours of work for any fleet; beyond it, `overloaded`
JOBS_MAX_BYTES = 1 << 30  # 1 GiB of store for them, whatever their prompts' sizes
JOBS_MAX_MSGS_PER_SUBJECT = 1  # one job per request id in flight: how the intake detects a duplicate id
JOBS_MAX_MSG_SIZE = 2 << 20  # above MAX_JOB_BYTES (1.27 MiB, the largest record) plus its headers

SUBMIT_MAX_MSGS = 100_000  # fire-and-forget prompts awaiting a scheduler; beyond it the publisher is refused
SUBMIT_MAX_BYTES = 1 << 30  # 1 GiB of store for them
SUBMIT_MAX_AGE_S = 24 * 3600.0  # a prompt no scheduler took for a day is dropped: the only silent loss
SUBMIT_MAX_MSGS_PER_SUBJECT = 10_000  # one submit subject (one tenant, with per-client subjects) fills 1/10th
SUBMIT_MAX_MSG_SIZE = 512 << 10  # above MAX_REQUEST_BYTES (272 KiB) plus headers; bigger is `oversize` anyway
SUBMIT_ACK_WAIT_S = 30.0  # covers storing the job (or answering an error) before the submission is acked
SUBMIT_DUPLICATE_WINDOW_S = 120.0  # a publisher's retry with the same Nats-Msg-Id within this is stored once

DONE_MAX_AGE_S = 15 * 60.0  # a replacement scheduler takes a job over within seconds; results older are moot
DONE_MAX_MSGS = 100_000  # results kept for replacement schedulers
DONE_MAX_BYTES = 1 << 30  # 1 GiB of store for them
DONE_MAX_MSGS_PER_SUBJECT = 1  # a session has one final result
DONE_MAX_MSG_SIZE = 8 << 20  # the embedded server's and deploy/'s max_payload: a bigger result cannot be sent

DELIVERED_MAX_MSGS = 1_000_000  # one key per reply within the bucket's TTL (minutes): far beyond any load
DELIVERED_MAX_BYTES = 256 << 20  # a key costs ~100 bytes of store
DELIVERED_MAX_VALUE_SIZE = 1024  # the value is the claiming scheduler's instance name

VOCAB_MAX_BYTES = 512 << 20  # target tokenizers: Qwen's bundle is ~10 MB, one per target vocabulary ever served


MAX_REPLICAS = 3  # copies of every stream and bucket on a cluster: any one node may die and nothing is lost
NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode": a single server
NO_PLACEMENT = 10005  # "no suitable peers for placement": a cluster of fewer nodes than the replicas asked
EXISTS_OTHERWISE = 10058  # "stream name already in use with a different configuration"

T = TypeVar("T")


JS_SETUP_PATIENCE_S = 30.0  # how long a stream or bucket set-up call is asked again while JetStream answers late


async def _patiently(call: Callable[[], Awaitable[T]], patience: float = JS_SETUP_PATIENCE_S) -> T:
    """`call()`, asked again while JetStream's API times out, for up to `patience` seconds.

    A cluster that has just formed, or that elects a new stream's leaders on a busy machine, can answer a create
    after the client's timeout: both schedulers of the chaos test's fresh 3-node cluster died so, creating their
    bucket. Every set-up call here is idempotent, so one that took effect after all is found the next time."""
    deadline = time.monotonic() + patience
    backoff = Backoff(initial=0.25, cap=2.0)  # jittered: services starting together do not ask in step
    while True:
        try:
            return await call()
        except nats.errors.TimeoutError:
            delay = backoff.next()
            if time.monotonic() + delay >= deadline:
                raise
            log.warning("JetStream did not answer a set-up request in time; asking again in %.2f s", delay)
            await asyncio.sleep(delay)


async def _replicated(attempt: Callable[[int], Awaitable[T]], replicas: int = MAX_REPLICAS) -> T:
    """`attempt(n)` with n = min(MAX_REPLICAS, the cluster's size) replicas, learned from the server's refusals:
    a single server refuses any n > 1, a cluster of two refuses 3. No client API tells a cluster's size, and
    what the server says is what it will accept. A late answer is asked again (`_patiently`)."""
    n = replicas
    while True:
        try:
            return await _patiently(functools.partial(attempt, n))
        except nats.js.errors.APIError as exc:
            if n == 1 or exc.err_code not in (NOT_CLUSTERED, NO_PLACEMENT):
                raise
            if exc.err_code == NO_PLACEMENT:
                log.warning("JetStream placed no %d replicas (%s); trying %d", n, exc.description, n - 1)
            n = 1 if exc.err_code == NOT_CLUSTERED else n - 1


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    async def attempt(n: int) -> None:
        replicated = config.evolve(num_replicas=n)
        try:
            await js.add_stream(replicated)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != EXISTS_OTHERWISE:
                raise
            await js.update_stream(replicated)

    await _replicated(attempt)


async def ensure_jobs_stream(
    js: JetStreamContext,
    *,
    ack_wait: float = JOBS_ACK_WAIT_S,
    max_ack_pending: int = JOBS_MAX_ACK_PENDING,
    duplicate_window: float = JOBS_DUPLICATE_WINDOW_S,
    max_msgs: int = JOBS_MAX_MSGS,
    max_bytes: int = JOBS_MAX_BYTES,
    max_age: float = JOBS_MAX_AGE_S,
    max_msg_size: int = JOBS_MAX_MSG_SIZE,
    storage: StorageType = StorageType.FILE,
) -> ConsumerInfo:
    """The accepted jobs (`draftwire.jobs.<id>`) and the durable pull consumer all schedulers share.

    Work-queue retention: a job stays stored until a scheduler acks it, after the reply went out, and the ack
    deletes it. One message per subject with "discard new per subject": while a job with id X is in flight, a
    second `js.publish` to `draftwire.jobs.X` is refused (err_code 10077, "maximum messages per subject
    exceeded"), which is how the scheduler detects a duplicate id. A full stream is refused with the same
    code ("maximum messages exceeded"): the intake answers that as overloaded. Each job is published with
    `Nats-Msg-Id: job-<session>`, so a publish retried after a lost PubAck (or a fire-and-forget submission
    turned into a job twice) is stored once within `duplicate_window`; the dedupe is checked before the
    per-subject limit, so such a retry gets a PubAck (duplicate), never a `duplicate_id`.

    ack_wait is short: a scheduler that works on a job sends in-progress acks every second, so one that
    died hands its jobs to another within seconds. max_deliver is unlimited because every job carries its
    deadline (a late redelivery answers `deadline_exceeded` at once); max_ack_pending bounds the jobs in
    flight across all schedulers.
    """
    await _ensure_stream(
        js,
        StreamConfig(
            name=JOBS_STREAM,
            description="draftwire accepted jobs awaiting or under a scheduler",
            subjects=[SUBJECTS.jobs_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=storage,
            max_msgs_per_subject=JOBS_MAX_MSGS_PER_SUBJECT,
            # Refuse, never drop: a job in the stream was promised a reply, and the refusal is what the
            # intake answers as `overloaded` (or `duplicate_id`, per subject).
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            duplicate_window=duplicate_window,
            max_msgs=max_msgs,
            max_bytes=max_bytes,
            max_age=max_age,
            max_msg_size=max_msg_size,
        ),
    )
    config = ConsumerConfig(
        durable_name=JOBS_CONSUMER,
        name=JOBS_CONSUMER,
        description="schedulers pull jobs; ack after the reply was delivered",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=SUBJECTS.jobs_all,
    )
    return await _patiently(lambda: js.add_consumer(JOBS_STREAM, config))


async def ensure_submit_stream(
    js: JetStreamContext,
    *,
    create_consumer: bool = True,
    ack_wait: float = SUBMIT_ACK_WAIT_S,
    duplicate_window: float = SUBMIT_DUPLICATE_WINDOW_S,
    max_msgs: int = SUBMIT_MAX_MSGS,
    max_bytes: int = SUBMIT_MAX_BYTES,
    max_age: float = SUBMIT_MAX_AGE_S,
    max_msgs_per_subject: int = SUBMIT_MAX_MSGS_PER_SUBJECT,
    max_msg_size: int = SUBMIT_MAX_MSG_SIZE,
    storage: StorageType = StorageType.FILE,
) -> ConsumerInfo | None:
    """Fire-and-forget submissions on `draftwire.submit`, kept until a scheduler turned them into jobs.

    A work queue with PubAcks, so `js.publish` confirms a submission was stored; a `Nats-Msg-Id` header
    dedupes a publisher's retries within `duplicate_window`. Full means refused, never silently dropping
    the oldest: the publisher's `js.publish` raises an APIError (err_code 10077, "maximum messages
    exceeded", "... per subject exceeded" or "maximum bytes exceeded"; 10054 for an over-size message).
    A scheduler acks a submission once its job is stored (or it was answered with an error on
    `draftwire.results.<id>`); `ack_wait` only has to cover that.
    """
    await _ensure_stream(
        js,
        StreamConfig(
            name=SUBMIT_STREAM,
            description="draftwire fire-and-forget prompts awaiting a scheduler",
            subjects=[SUBJECTS.submit, SUBJECTS.submit_tenants],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=storage,
            duplicate_window=duplicate_window,
            # NEW: a full stream refuses the next prompt with an error its publisher sees, where OLD would
            # silently delete prompts that were already acknowledged as stored. Per subject too: without
            # discard_new_per_subject the per-subject limit would drop that subject's oldest prompt.
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            max_msgs=max_msgs,
            max_bytes=max_bytes,
            max_age=max_age,
            max_msgs_per_subject=max_msgs_per_subject,
            max_msg_size=max_msg_size,
        ),
    )
    if not create_consumer:
        return None
    config = ConsumerConfig(
        durable_name=SUBMIT_CONSUMER,
        name=SUBMIT_CONSUMER,
        description="schedulers turn submissions into jobs; ack once the job is stored",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=-1,  # no filter: the stream holds only submissions (shared and per tenant)
    )
    return await js.add_consumer(SUBMIT_STREAM, config)


async def ensure_done_stream(
    js: JetStreamContext,
    *,
    max_msgs: int = DONE_MAX_MSGS,
    max_bytes: int = DONE_MAX_BYTES,
    max_age: float = DONE_MAX_AGE_S,
    max_msg_size: int = DONE_MAX_MSG_SIZE,
    storage: StorageType = StorageType.FILE,
) -> None:
    """Each session's final result or error (`draftwire.done.<session>`), kept for a replacement scheduler.

    The draft publishes there (with `js.publish`) and the scheduler reads it live (a core subscription) and
    after the fact (`js.get_last_msg`); limits retention, one message per subject, for 15 minutes.
    """
    await _ensure_stream(
        js,
        StreamConfig(
            name=DONE_STREAM,
            description="draftwire final results by session",
            subjects=[SUBJECTS.done_all],
            retention=RetentionPolicy.LIMITS,
            storage=storage,
            # OLD: this is a recovery copy (the scheduler gets the result live); when full, the oldest
            # result, nearest its expiry and long delivered, goes rather than a new one being refused.
            discard=DiscardPolicy.OLD,
            max_msgs_per_subject=DONE_MAX_MSGS_PER_SUBJECT,
            max_msgs=max_msgs,
            max_bytes=max_bytes,
            max_age=max_age,
            max_msg_size=max_msg_size,
        ),
    )


async def ensure_delivered_bucket(
    js: JetStreamContext, *, ttl: float, max_msgs: int = DELIVERED_MAX_MSGS
) -> KeyValue:
    """The KV bucket in which a scheduler creates key `<session>` before replying: the one that creates it
    replies, any other (a replacement racing a slow original) does not. If the bucket exists with another TTL
    (another scheduler has another timeout), it is used as it is.

    Bounded like the streams: history 1 is one message per key, the TTL its age. nats-py's KV streams discard
    NEW (kept: dropping an old key would let a second scheduler reply again; a refused create means no reply,
    never two) and have no message limit, so that is set on the bucket's stream afterwards, with the size
    limits (which also bounds a bucket an older version made without them).
    """
    async def create(n: int) -> KeyValue:
        config = KeyValueConfig(
            bucket=DELIVERED_BUCKET,
            description="draftwire: sessions whose reply was sent",
            history=1,
            ttl=ttl,
            max_bytes=DELIVERED_MAX_BYTES,
            max_value_size=DELIVERED_MAX_VALUE_SIZE,
            storage=StorageType.FILE,
            replicas=n,
        )
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != EXISTS_OTHERWISE:
                raise
            return await js.key_value(DELIVERED_BUCKET)

    async def bound(n: int) -> None:  # also brings a bucket made with fewer replicas up to n
        stream = (await js.stream_info(f"KV_{DELIVERED_BUCKET}")).config
        bounded = stream.evolve(
            max_msgs=max_msgs, max_bytes=DELIVERED_MAX_BYTES, max_msg_size=DELIVERED_MAX_VALUE_SIZE,
            num_replicas=n,
        )
        if bounded != stream:
            await js.update_stream(bounded)

    kv = await _replicated(create)
    await _replicated(bound)
    return kv


async def vocab_store(js: JetStreamContext, *, create: bool):
    """The object store of target tokenizers (`VOCAB_BUCKET`): created, bounded, by the edge that writes it
    (`create`); only bound to by a device, which may read it and nothing else. BucketNotFoundError when a
    device finds none."""
    if not create:
        return await js.object_store(VOCAB_BUCKET)
    try:
        return await js.object_store(VOCAB_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass

    async def create(n: int):
        config = ObjectStoreConfig(bucket=VOCAB_BUCKET, description="draftwire target tokenizers by vocabulary "
                                   "digest", max_bytes=VOCAB_MAX_BYTES, storage=StorageType.FILE, replicas=n)
        try:
            return await js.create_object_store(VOCAB_BUCKET, config)
        except nats.js.errors.BadRequestError as exc:  # another edge created it meanwhile
            if exc.err_code != EXISTS_OTHERWISE:
                raise
            return await js.object_store(VOCAB_BUCKET)

    return await _replicated(create)


async def publish_vocabulary(js: JetStreamContext, digest: str, data: bytes) -> bool:
    """Store a target's tokenizer bundle under its digest, once: an object already there (same digest, so the
    same content) is left alone. Returns whether it wrote."""
    store = await vocab_store(js, create=True)
    try:
        await store.get_info(digest)
        return False
    except nats.js.errors.ObjectNotFoundError:
        pass
    await store.put(digest, data)
    return True


async def fetch_vocabulary(js: JetStreamContext, digest: str) -> bytes:
    """The bundle stored under `digest` (never a name). nats.js.errors.BucketNotFoundError /
    ObjectNotFoundError when there is none; the caller checks the bytes against the digest."""
    store = await vocab_store(js, create=False)
    return (await store.get(digest)).data


async def jobs_subscription(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    """Bind to the shared jobs consumer; `await sub.fetch(n, timeout)` raises nats.errors.TimeoutError when
    nothing is queued."""
    return await js.pull_subscribe_bind(JOBS_CONSUMER, stream=JOBS_STREAM)


async def submit_subscription(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    return await js.pull_subscribe_bind(SUBMIT_CONSUMER, stream=SUBMIT_STREAM)


# --- micro services ----------------------------------------------------------------------------------------


def endpoint_name(subject: str) -> str:
    """A micro endpoint name ([A-Za-z0-9_-]) from its subject: `draftwire.verify.v1` -> `verify-v1`."""
    stem = subject.removeprefix(f"{ROOT}.")
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem.replace(">", "all").replace("*", "any")).strip("-")
    return name or "endpoint"
