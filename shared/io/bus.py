"""NATS helpers every draftwire service uses: subjects, connect, trace-carrying messages, JetStream, micro.

All internal subjects live under `draftwire.>` and are built here, so a typo cannot silently create a
subject nobody listens on, and ids are validated before they become subject tokens.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

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
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from shared.io.nats_server import is_reachable

log = logging.getLogger(__name__)

ROOT = "draftwire"
PROMPT_STREAM = "DRAFTWIRE_PROMPTS"
PROMPT_CONSUMER = "DRAFTWIRE_SCHEDULER"
REPLY_CLAIMS_BUCKET = "DRAFTWIRE_REPLY_CLAIMS"
VERIFY_QUEUE = "verifiers"
INSTANCE_HEADER = "Draftwire-Instance"  # verifier replies name their instance: the device sticks to it
_BAD_TOKEN = re.compile(r"[\s.*>]")
_MAX_TOKEN = 256


def validate_token(value: str, what: str = "id") -> str:
    """Return `value` if it is usable as one NATS subject token, else raise a ValueError that says why."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > _MAX_TOKEN:
        raise ValueError(f"{what} is longer than {_MAX_TOKEN} characters: {value[:40]!r}...")
    if bad := _BAD_TOKEN.search(value):
        raise ValueError(
            f"{what} {value!r} is not a valid NATS subject token: contains {bad.group()!r} "
            "(whitespace, '.', '*' and '>' are not allowed)"
        )
    return value


@dataclass(frozen=True)
class Subjects:
    """The subject map. Fixed subjects are fields; per-id subjects are methods that validate the id."""

    all: str = f"{ROOT}.>"
    prompts: str = f"{ROOT}.prompts"  # micro endpoint, queue group `schedulers` (request/reply)
    submit: str = f"{ROOT}.submit"  # JetStream, fire-and-forget; results on `results.<id>`
    cancel_all: str = f"{ROOT}.cancel.*"
    jobs_all: str = f"{ROOT}.jobs.*"  # internal: accepted jobs, one per request id in flight
    done_all: str = f"{ROOT}.done.*"  # internal: each session's final result, kept for a replacement scheduler
    verify: str = f"{ROOT}.verify"
    verifier_info: str = f"{ROOT}.verifier.info"
    sessions_close: str = f"{ROOT}.sessions.close"
    draft_start: str = f"{ROOT}.draft.start"
    events_round: str = f"{ROOT}.events.round"
    events_request: str = f"{ROOT}.events.request"
    events_all: str = f"{ROOT}.events.>"
    streams_all: str = f"{ROOT}.stream.*"

    def stream(self, request_id: str) -> str:
        return f"{ROOT}.stream.{validate_token(request_id, 'request id')}"

    def results(self, request_id: str) -> str:
        """Every final result or error of a prompt, for publishers that sent it without a reply subject."""
        return f"{ROOT}.results.{validate_token(request_id, 'request id')}"

    def cancel(self, request_id: str) -> str:
        """Publish anything here to cancel request `request_id` (queued or running)."""
        return f"{ROOT}.cancel.{validate_token(request_id, 'request id')}"

    def jobs(self, request_id: str) -> str:
        return f"{ROOT}.jobs.{validate_token(request_id, 'request id')}"

    def done(self, session: str) -> str:
        return f"{ROOT}.done.{validate_token(session, 'session id')}"

    def draft_session(self, session: str) -> str:
        """Held by the one draft instance running `session`: "no responders" here means nobody runs it."""
        return f"{ROOT}.draft.session.{validate_token(session, 'session id')}"

    def verify_instance(self, instance: str) -> str:
        return f"{ROOT}.verify.{validate_token(instance, 'verifier instance')}"


SUBJECTS = Subjects()


# --- connection -------------------------------------------------------------------------------------------


async def _log_error(exc: Exception) -> None:
    # nats-py's default callback logs a full traceback for every failed (re)connect attempt.
    log.warning("NATS client error: %s", exc or type(exc).__name__)


async def connect(url: str, name: str, *, initial_timeout: float = 5.0, **kw) -> Client:
    """Connect with a bounded first attempt, then reconnect forever.

    nats-py retries the *initial* connect too (60 x 2 s by default, forever with max_reconnect_attempts=-1),
    so a missing server would hang a service for minutes. We bound the first connect with
    `initial_timeout` and raise ConnectionError; once connected, the client reconnects indefinitely so a
    restarted server does not take the services down. `kw` overrides any nats.connect option.
    """
    opts: dict = {
        "name": name,
        "connect_timeout": 2,
        "allow_reconnect": True,
        "reconnect_time_wait": 1,
        "max_reconnect_attempts": -1,
        "ping_interval": 20,
        "max_outstanding_pings": 3,
        "error_cb": _log_error,
        **kw,
    }
    if not await is_reachable(url, timeout=min(initial_timeout, 2.0)):
        raise ConnectionError(
            f"NATS server at {url} is not reachable (is it running? `draftwire up` starts one)"
        )
    nc = Client()
    try:
        await asyncio.wait_for(nc.connect(servers=[url], **opts), initial_timeout)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        cause = nc.last_error or exc
        await nc.close()
        raise ConnectionError(
            f"could not connect to NATS at {url} within {initial_timeout}s: {cause!r}"
        ) from exc
    return nc


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


# --- JetStream prompt queue ---------------------------------------------------------------------------------


async def ensure_prompt_stream(
    js: JetStreamContext,
    *,
    ack_wait: float = 60.0,
    max_deliver: int = 3,
    max_ack_pending: int = 256,
    max_age: float = 24 * 3600.0,
    storage: StorageType = StorageType.FILE,
    create_consumer: bool = True,
) -> ConsumerInfo | None:
    """Create or update the prompt stream and (by default) its durable pull consumer.

    Work-queue retention: a prompt stays stored until the scheduler acks it, and the ack deletes it. The
    scheduler acks only after the result was delivered, so "acked" means "done" and a scheduler crash
    mid-generation leaves the prompt to be redelivered after `ack_wait`. A work-queue stream allows one
    consumer per subject, so all schedulers share the durable `PROMPT_CONSUMER` (pull consumers load-balance);
    to observe prompts, subscribe with core NATS on `draftwire.prompts` instead of adding a consumer.

    no_ack: a stream answers every captured publish that has a reply subject with a PubAck, so a user's
    `nc.request("draftwire.prompts", ...)` would get `{"stream": ..., "seq": ...}` instead of its result.
    The stream therefore sends no PubAcks, and `js.publish()` to this subject times out waiting for one
    (the prompt is stored all the same): publish prompts with core NATS. JetStream does not keep the
    publisher's reply subject either; the scheduler records it from its own core subscription.

    ack_wait: long enough for a short request, not for a long generation: the scheduler calls
    `msg.in_progress()` every few seconds while it works, which resets the timer. max_deliver bounds retries
    of a poison prompt; max_ack_pending bounds prompts in flight across all schedulers.
    """
    config = StreamConfig(
        name=PROMPT_STREAM,
        description="draftwire user prompts awaiting a scheduler",
        subjects=[SUBJECTS.prompts],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=storage,
        max_age=max_age,
        no_ack=True,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:  # "stream name already in use with a different configuration"
            raise
        await js.update_stream(config)
    if not create_consumer:
        return None
    return await ensure_prompt_consumer(
        js, ack_wait=ack_wait, max_deliver=max_deliver, max_ack_pending=max_ack_pending
    )


async def ensure_reply_claims(js: JetStreamContext, *, ttl: float) -> KeyValue:
    """The KV bucket in which schedulers claim reply subjects, one winner each (see the scheduler's docs).

    In memory with a TTL: a claim only has to outlive the requests it arbitrates. If the bucket exists with
    other settings (another scheduler chose another TTL), it is used as it is.
    """
    config = KeyValueConfig(
        bucket=REPLY_CLAIMS_BUCKET,
        description="draftwire: which scheduler answers which reply subject",
        history=1,
        ttl=ttl,
        storage=StorageType.MEMORY,
    )
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != 10058:  # "stream name already in use with a different configuration"
            raise
        return await js.key_value(REPLY_CLAIMS_BUCKET)


async def ensure_prompt_consumer(
    js: JetStreamContext, *, ack_wait: float = 60.0, max_deliver: int = 3, max_ack_pending: int = 256
) -> ConsumerInfo:
    """Create or update the durable pull consumer (editable fields such as ack_wait are updated in place).

    We create it explicitly because js.pull_subscribe() only creates a missing durable and never updates it.
    """
    config = ConsumerConfig(
        durable_name=PROMPT_CONSUMER,
        name=PROMPT_CONSUMER,
        description="schedulers pull prompts; ack after the result was delivered",
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        filter_subject=SUBJECTS.prompts,
    )
    return await js.add_consumer(PROMPT_STREAM, config)


async def prompt_subscription(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    """Bind to the durable prompt consumer; `await sub.fetch(n, timeout)` raises nats.errors.TimeoutError
    when nothing is queued."""
    return await js.pull_subscribe_bind(PROMPT_CONSUMER, stream=PROMPT_STREAM)


# --- micro services ----------------------------------------------------------------------------------------


def endpoint_name(subject: str) -> str:
    """A micro endpoint name ([A-Za-z0-9_-]) derived from its subject: `draftwire.verify.v1` -> `verify-v1`."""
    stem = subject.removeprefix(f"{ROOT}.")
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", stem.replace(">", "all").replace("*", "any")).strip("-")
    return name or "endpoint"
