"""Bounded JetStream (issue 10, item 4), on a real nats-server: every stream draftwire creates carries limits
on messages, bytes, age, messages per subject and message size; a full stream refuses (and keeps what it
stored) where a silent drop would lose an accepted prompt; the scheduler answers a full job queue at once."""

from __future__ import annotations

import asyncio
import json
import time

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import KeyValueConfig

from draftwire.shared.core.prompt_request import MAX_JOB_BYTES, MAX_REQUEST_BYTES
from draftwire.shared.io import bus
from draftwire.shared.io.bus import (
    DELIVERED_BUCKET,
    DONE_STREAM,
    JOBS_STREAM,
    SUBJECTS,
    SUBMIT_STREAM,
    ensure_delivered_bucket,
    ensure_done_stream,
    ensure_jobs_stream,
    ensure_submit_stream,
)
from draftwire.shared.io.nats_server import DEFAULT_MAX_PAYLOAD
from tests.in_process import scheduler
from tests.nats_fixtures import *

LIMIT_EXCEEDED, TOO_BIG = 10077, 10054  # JetStream's err_codes for a store refused by a limit / by size
HEADER_ROOM = 16 * 1024  # Nats-Msg-Id, traceparent, tracestate, baggage (the W3C propagator caps it at 8 KiB)
KV_STREAM = f"KV_{DELIVERED_BUCKET}"


async def _ensure_all(js) -> None:
    """What the scheduler and the draft create at start (a test below checks the running scheduler too)."""
    await ensure_jobs_stream(js)
    await ensure_submit_stream(js)
    await ensure_done_stream(js)
    await ensure_delivered_bucket(js, ttl=60.0)


def _assert_bounded(config) -> None:
    for field in ("max_msgs", "max_bytes", "max_msgs_per_subject", "max_msg_size"):
        value = getattr(config, field)
        assert value is not None and value > 0, (config.name, field, value)
    assert config.max_age and config.max_age > 0, (config.name, "max_age")


async def _refused(js, subject: str, data: bytes, headers: dict | None = None) -> nats.js.errors.APIError:
    t0 = time.monotonic()
    with pytest.raises(nats.js.errors.APIError) as info:
        await js.publish(subject, data, headers=headers, timeout=5)
    assert time.monotonic() - t0 < 1.0, "a refusal is an immediate answer, not a timeout"
    return info.value


# --- configuration ------------------------------------------------------------------------------------------


async def test_every_stream_the_system_creates_is_bounded(nc):
    js = nc.jetstream()
    await _ensure_all(js)
    configs = {info.config.name: info.config for info in await js.streams_info()}
    assert set(configs) == {JOBS_STREAM, SUBMIT_STREAM, DONE_STREAM, KV_STREAM}
    for config in configs.values():
        _assert_bounded(config)

    limits = ("max_msgs", "max_bytes", "max_age", "max_msgs_per_subject", "max_msg_size", "discard")
    b = bus
    expected = {
        JOBS_STREAM: (b.JOBS_MAX_MSGS, b.JOBS_MAX_BYTES, b.JOBS_MAX_AGE_S, 1, b.JOBS_MAX_MSG_SIZE, "new"),
        SUBMIT_STREAM: (b.SUBMIT_MAX_MSGS, b.SUBMIT_MAX_BYTES, b.SUBMIT_MAX_AGE_S,
                        b.SUBMIT_MAX_MSGS_PER_SUBJECT, b.SUBMIT_MAX_MSG_SIZE, "new"),
        DONE_STREAM: (b.DONE_MAX_MSGS, b.DONE_MAX_BYTES, b.DONE_MAX_AGE_S, 1, b.DONE_MAX_MSG_SIZE, "old"),
        KV_STREAM: (b.DELIVERED_MAX_MSGS, b.DELIVERED_MAX_BYTES, 60.0, 1, b.DELIVERED_MAX_VALUE_SIZE, "new"),
    }  # fmt: skip
    for name, values in expected.items():
        assert tuple(getattr(configs[name], f) for f in limits) == values, name
    # where a subject's limit is reached, refuse the new message rather than drop that subject's oldest one
    assert configs[JOBS_STREAM].discard_new_per_subject and configs[SUBMIT_STREAM].discard_new_per_subject


async def test_the_running_scheduler_creates_only_bounded_streams(nats_server, nc):
    async with scheduler(nats_server.url, instance="sched-limits"):
        infos = await nc.jetstream().streams_info()
    assert {i.config.name for i in infos} >= {JOBS_STREAM, SUBMIT_STREAM, DONE_STREAM, KV_STREAM}
    for info in infos:
        _assert_bounded(info.config)


async def test_an_unbounded_delivered_bucket_from_before_is_bounded(nc):
    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=DELIVERED_BUCKET, history=1, ttl=60.0))
    assert (await js.stream_info(KV_STREAM)).config.max_bytes in (None, -1)
    await ensure_delivered_bucket(js, ttl=60.0)
    _assert_bounded((await js.stream_info(KV_STREAM)).config)


def test_message_size_limits_fit_the_largest_legal_messages():
    assert bus.SUBMIT_MAX_MSG_SIZE >= MAX_REQUEST_BYTES + HEADER_ROOM
    assert bus.JOBS_MAX_MSG_SIZE >= MAX_JOB_BYTES + HEADER_ROOM
    assert bus.DONE_MAX_MSG_SIZE == DEFAULT_MAX_PAYLOAD  # what core NATS would carry anyway


# --- behaviour ----------------------------------------------------------------------------------------------


async def test_a_full_submit_stream_refuses_the_next_prompt_and_keeps_the_stored_ones(nc):
    js = nc.jetstream()
    await ensure_submit_stream(js, create_consumer=False, max_msgs=3)
    stored = [await js.publish(SUBJECTS.submit, f"prompt {i}".encode()) for i in range(3)]
    refusal = await _refused(js, SUBJECTS.submit, b"prompt 3")
    assert (refusal.err_code, refusal.description) == (LIMIT_EXCEEDED, "maximum messages exceeded")
    state = (await js.stream_info(SUBMIT_STREAM)).state
    assert (state.messages, state.first_seq, state.last_seq) == (3, 1, 3), "none of the accepted ones dropped"
    for ack in stored:
        assert (await js.get_msg(SUBMIT_STREAM, ack.seq)).data == f"prompt {ack.seq - 1}".encode()


async def test_a_submit_stream_full_in_bytes_refuses_too(nc):
    js = nc.jetstream()
    await ensure_submit_stream(js, create_consumer=False, max_bytes=4096)
    await js.publish(SUBJECTS.submit, b"x" * 2000)
    refusal = await _refused(js, SUBJECTS.submit, b"y" * 3000)
    assert (refusal.err_code, refusal.description) == (LIMIT_EXCEEDED, "maximum bytes exceeded")
    assert (await js.get_msg(SUBMIT_STREAM, 1)).data == b"x" * 2000


async def test_per_subject_limits_hold(nc):
    js = nc.jetstream()
    # submit: a subject at its limit is refused, its stored prompts kept, while the stream has room
    await ensure_submit_stream(js, create_consumer=False, max_msgs_per_subject=2)
    await js.publish(SUBJECTS.submit, b"a")
    await js.publish(SUBJECTS.submit, b"b")
    refusal = await _refused(js, SUBJECTS.submit, b"c")
    assert (refusal.err_code, refusal.description) == (
        LIMIT_EXCEEDED,
        "maximum messages per subject exceeded",
    )
    assert (await js.get_msg(SUBMIT_STREAM, 1)).data == b"a"
    await js.publish(SUBJECTS.submit_for("tenant2"), b"d")  # one tenant's full share leaves the others theirs
    assert (await js.stream_info(SUBMIT_STREAM)).state.messages == 3
    # jobs: one per request id in flight; another id is stored
    await ensure_jobs_stream(js)
    await js.publish(SUBJECTS.jobs("r1"), b"job")
    assert "per subject" in (await _refused(js, SUBJECTS.jobs("r1"), b"again")).description
    await js.publish(SUBJECTS.jobs("r2"), b"job")
    # done: one result per session; a republished result replaces it (discard old), other sessions untouched
    await ensure_done_stream(js)
    for body in (b"first", b"second"):
        await js.publish(SUBJECTS.done("s1"), body)
    await js.publish(SUBJECTS.done("s2"), b"other")
    assert (await js.get_last_msg(DONE_STREAM, SUBJECTS.done("s1"))).data == b"second"
    assert (await js.stream_info(DONE_STREAM)).state.messages == 2


async def test_a_full_done_stream_drops_its_oldest_result_not_the_new_one(nc):
    js = nc.jetstream()
    await ensure_done_stream(js, max_msgs=2)
    for s in ("s1", "s2", "s3"):
        await js.publish(SUBJECTS.done(s), s.encode())
    assert (await js.get_last_msg(DONE_STREAM, SUBJECTS.done("s3"))).data == b"s3"
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.get_last_msg(DONE_STREAM, SUBJECTS.done("s1"))


@pytest.mark.parametrize("stream", ["submit", "jobs", "done"])
async def test_an_oversize_message_is_refused(nc, stream):
    js = nc.jetstream()
    limit = 1000
    ensure, subject = {
        "submit": (
            lambda: ensure_submit_stream(js, create_consumer=False, max_msg_size=limit),
            SUBJECTS.submit,
        ),
        "jobs": (lambda: ensure_jobs_stream(js, max_msg_size=limit), SUBJECTS.jobs("r1")),
        "done": (lambda: ensure_done_stream(js, max_msg_size=limit), SUBJECTS.done("s1")),
    }[stream]
    await ensure()
    refusal = await _refused(js, subject, b"x" * (limit + 1))
    assert refusal.err_code == TOO_BIG and "exceeds maximum" in refusal.description
    await js.publish(subject, b"x" * (limit - 64), headers={"Nats-Msg-Id": "m1"})  # headers count too


async def test_default_submit_limit_takes_the_largest_request_and_refuses_more(nc):
    js = nc.jetstream()
    await ensure_submit_stream(js, create_consumer=False)
    headers = bus.inject_headers({"Nats-Msg-Id": "big", "Content-Type": "application/json"})
    await js.publish(SUBJECTS.submit, b"x" * MAX_REQUEST_BYTES, headers=headers)
    refusal = await _refused(js, SUBJECTS.submit, b"x" * (bus.SUBMIT_MAX_MSG_SIZE + 1))
    assert refusal.err_code == TOO_BIG


async def test_the_scheduler_answers_a_full_job_queue_overloaded_at_once(nats_server, nc):
    js = nc.jetstream()
    async with scheduler(nats_server.url, instance="sched-limits"):
        await ensure_jobs_stream(js, max_msgs=1)  # after the scheduler's own ensure: shrink the queue to one
        inbox = nc.new_inbox()
        await nc.subscribe(
            inbox
        )  # the first requester: its job waits for a draft (none runs), filling the queue
        await nc.publish(
            "draftwire.prompts", json.dumps({"id": "first", "prompt": "x"}).encode(), reply=inbox
        )
        deadline = time.monotonic() + 5
        while (await js.stream_info(JOBS_STREAM)).state.messages < 1:
            assert time.monotonic() < deadline, "the first job was never stored"
            await asyncio.sleep(0.02)
        t0 = time.monotonic()
        reply = await nc.request("draftwire.prompts", json.dumps({"id": "second", "prompt": "y"}).encode(),
                                 timeout=5)  # fmt: skip
        error = json.loads(reply.data)["error"]
        assert error["code"] == "overloaded" and "full" in error["message"], error
        assert time.monotonic() - t0 < 2.0, "answered at once, not after retries"
        assert (await js.stream_info(JOBS_STREAM)).state.messages == 1


async def test_a_set_up_call_jetstream_answers_late_is_asked_again_keeping_its_replicas():
    """A fresh cluster electing a new stream's leaders can answer after the client's timeout; the set-up asks
    again (every set-up call is idempotent) instead of the service dying at start, and a late answer says
    nothing about the cluster's size, so the replicas asked for stay."""
    asked = []

    async def attempt(n: int) -> str:
        asked.append(n)
        if len(asked) < 3:
            raise nats.errors.TimeoutError
        return "created"

    assert await bus._replicated(attempt) == "created"
    assert asked == [bus.MAX_REPLICAS] * 3

    async def never() -> None:
        asked.append(0)
        raise nats.errors.TimeoutError

    asked.clear()
    t0 = time.monotonic()
    with pytest.raises(nats.errors.TimeoutError):
        await bus._patiently(never, patience=1.0)
    assert 2 <= len(asked) <= 4 and time.monotonic() - t0 < 1.5  # waits of at most 0.25 + 0.5 (+ 1) s, then it gives up
