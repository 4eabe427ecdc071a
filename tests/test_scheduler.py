"""Scheduler against a real nats-server (JetStream on) and a fake draft (tests/fake_draft.py): the intake,
the job queue, deadlines, cancel, fire-and-forget and draft failover of docs/sessions.md, in seconds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgpack
import nats.errors
import pytest
from opentelemetry.trace import SpanKind

from draftwire.services.scheduler.service import (
    CANCEL_GRACE_S,
    DEADLINE_GRACE_S,
    SESSIONS_SUBJECT,
    STORE_TRIES,
    RecentCancels,
    Scheduler,
    Work,
    build_parser,
    defaults_from_args,
    draft_result,
    session_progress,
    sessions_snapshot,
    start_outcome,
    submission_session,
)
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import GenerateJob, JobRecord
from draftwire.shared.io import bus
from draftwire.shared.io.bus import (
    JOBS_ACK_WAIT_S,
    JOBS_STREAM,
    SUBJECTS,
    SUBMIT_STREAM,
    ensure_jobs_stream,
    ensure_submit_stream,
    flush,
    submit_subscription,
)
from draftwire.shared.io.service_shell import READY_PREFIX, ServiceContext, register
from tests.fake_draft import FakeDraft
from tests.in_process import scheduler
from tests.nats_fixtures import *
from tests.otlp_receiver import *

REPO = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
USER_SPAN = "00f067aa0ba902b7"


async def _results(nc, subject: str = "draftwire.results.*") -> asyncio.Queue:
    got: asyncio.Queue = asyncio.Queue()

    async def cb(msg):
        await got.put(msg)

    await nc.subscribe(subject, cb=cb)
    await flush(nc)
    return got


async def _jobs_empty(nc, stream: str = JOBS_STREAM, timeout: float = 5.0) -> None:
    """Work-queue retention: an acked job is deleted, so an empty stream means every job was answered."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while (n := (await js.stream_info(stream)).state.messages) != 0:
        assert time.monotonic() < deadline, f"{n} job(s) still in {stream}"
        await asyncio.sleep(0.05)


async def _sessions(nc, subject: str = SESSIONS_SUBJECT) -> list[dict]:
    return json.loads((await nc.request(subject, b"", timeout=2)).data)["sessions"]


async def _until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --- intake -------------------------------------------------------------------------------------------------


async def test_plain_text_request_gets_the_json_result_and_results_subject_a_copy(nats_server, nc):
    draft = await FakeDraft(nc).start()
    results = await _results(nc)
    async with scheduler(nats_server.url):
        t0 = time.time()
        msg = await nc.request("draftwire.prompts", "héllo wörld".encode(), timeout=5)
        body = json.loads(msg.data)
        assert body["text"] == "HÉLLO WÖRLD" and body["finish_reason"] == "length"
        assert body["stats"]["acceptance_rate"] == 0.75 and body["stats"]["mode"] == "tkslt"
        assert msg.headers["Content-Type"] == "application/json"
        published = await asyncio.wait_for(results.get(), 5)
        assert published.subject == SUBJECTS.results(body["id"]) and json.loads(published.data) == body
        (job,) = draft.jobs
        assert job.id == body["id"] and job.format == "text" and (job.spec.gamma, job.spec.k) == (4, 8)
        assert len(job.session) == 16 and job.session != job.id and int(job.session, 16) >= 0
        assert t0 + 600 - 1 < job.deadline < time.time() + 600, "default timeout: --request-timeout"
        await _jobs_empty(nc)


async def test_json_and_msgpack_requests_get_replies_in_their_own_format(nats_server, nc):
    draft = await FakeDraft(nc).start()
    async with scheduler(
        nats_server.url, "--default-mode", "full", "--default-gamma", "6", "--default-k", "3"
    ):
        req = {
            "id": "j-1",
            "prompt": "abc",
            "temperature": 0.5,
            "top_p": 0.9,
            "seed": 7,
            "max_new_tokens": 9,
            "min_new_tokens": 2,
            "k": 11,
            "stream": True,
        }
        msg = await nc.request("draftwire.prompts", json.dumps(req).encode(), timeout=5)
        body = json.loads(msg.data)
        assert body["id"] == "j-1" and body["text"] == "ABC"
        job = draft.jobs[-1]
        assert (job.spec.mode, job.spec.gamma, job.spec.k) == ("full", 6, 11), "auto -> default; k explicit"
        assert (job.params.temperature, job.params.top_p, job.params.seed) == (0.5, 0.9, 7)
        assert (job.params.max_new_tokens, job.params.min_new_tokens, job.stream) == (9, 2, True)

        msg = await nc.request(
            "draftwire.prompts", msgpack.packb({"id": "m-1", "prompt": "xyz", "mode": "ar"}), timeout=5
        )
        body = msgpack.unpackb(msg.data)
        assert body["id"] == "m-1" and body["text"] == "XYZ" and body["stats"]["mode"] == "ar"
        assert msg.headers["Content-Type"] == "application/msgpack" and draft.jobs[-1].format == "msgpack"

        # Content-Type decides: this JSON-looking body is a text prompt
        msg = await nc.request(
            "draftwire.prompts", b'{"prompt": 1}', timeout=5, headers={"Content-Type": "text/plain"}
        )
        assert json.loads(msg.data)["text"] == '{"PROMPT": 1}'


async def test_bad_requests_are_answered_at_once_and_never_stored(nats_server, nc):
    draft = await FakeDraft(nc).start()
    results = await _results(nc)
    async with scheduler(nats_server.url):
        cases = [
            (b"\xc1\xff garbage \xfe", json.loads, "bad_encoding"),
            (msgpack.packb({"prompt": "x", "max_new_tokens": "many"}), msgpack.unpackb, "bad_param"),
            (json.dumps({"id": "bad-1", "prompt": "x", "top_p": 7}).encode(), json.loads, "bad_param"),
            (json.dumps({"prompt": "x", "tempreature": 1}).encode(), json.loads, "bad_request"),
            (json.dumps({"prompt": "x", "timeout_s": 0}).encode(), json.loads, "bad_param"),
            (b"a" * 1_000_000, json.loads, "oversize"),
        ]
        for data, decode, code in cases:
            err = decode((await nc.request("draftwire.prompts", data, timeout=5)).data)["error"]
            assert err["code"] == code and err["message"], (data[:40], err)
        published = await asyncio.wait_for(results.get(), 5)  # only the error whose id was known
        assert published.subject == SUBJECTS.results("bad-1")
        assert json.loads(published.data)["error"]["code"] == "bad_param"
        assert draft.jobs == [] and (await nc.jetstream().stream_info(JOBS_STREAM)).state.last_seq == 0

        msg = await nc.request("draftwire.prompts", b"still alive?", timeout=5)
        assert json.loads(msg.data)["text"] == "STILL ALIVE?"
        assert results.qsize() == 1, "only the good one's copy"


async def test_no_scheduler_means_no_responders_at_once(nats_server, nc):
    async with scheduler(nats_server.url):
        pass  # its streams and consumers stay behind; none of them may answer for the schedulers
    t0 = time.monotonic()
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request("draftwire.prompts", b"anyone?", timeout=5)
    assert time.monotonic() - t0 < 1


async def test_a_second_request_with_an_id_in_flight_is_a_duplicate_until_the_first_is_answered(
    nats_server, nc
):
    draft = await FakeDraft(nc, "hold").start()
    results = await _results(nc, SUBJECTS.results("dup"))
    async with scheduler(nats_server.url):
        first = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "dup", "prompt": "one"}', timeout=8)
        )
        await asyncio.wait_for(draft.received.wait(), 5)
        t0 = time.monotonic()
        second = await nc.request(
            "draftwire.prompts", msgpack.packb({"id": "dup", "prompt": "two"}), timeout=5
        )
        assert time.monotonic() - t0 < 1
        err = msgpack.unpackb(second.data)
        assert err["error"]["code"] == "duplicate_id" and err["id"] == "dup"
        assert results.empty(), "results.dup belongs to the running job, not to the refused duplicate"
        draft.release.set()
        assert json.loads((await first).data)["text"] == "ONE"
        await _jobs_empty(nc)
        again = await nc.request("draftwire.prompts", b'{"id": "dup", "prompt": "three"}', timeout=5)
        assert json.loads(again.data)["text"] == "THREE", "the ack freed the id"
        assert [j.prompt for j in draft.jobs] == ["one", "three"]


async def test_the_intake_does_not_wait_for_generations(nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()
    async with scheduler(nats_server.url, "--max-inflight", "1"):
        pending = [
            asyncio.ensure_future(
                nc.request("draftwire.prompts", f'{{"id": "p{i}", "prompt": "p{i}"}}'.encode(), timeout=8)
            )
            for i in range(3)
        ]
        await _until(lambda: _stored(nc, 3), what="3 jobs stored")
        assert len(draft.jobs) == 1 and not any(p.done() for p in pending), "one runs, two are queued"
        draft.release.set()
        bodies = [json.loads((await p).data) for p in pending]
        assert [b["text"] for b in bodies] == ["P0", "P1", "P2"]


async def _stored(nc, n: int) -> bool:
    return (await nc.jetstream().stream_info(JOBS_STREAM)).state.last_seq >= n


async def test_a_job_longer_than_ack_wait_stays_with_its_scheduler(nats_server, nc):
    draft = await FakeDraft(nc, delay=JOBS_ACK_WAIT_S + 1.5).start()
    # --max-inflight 1: the holder pulls no more, so a redelivery could only go to the other one
    one = ("--max-inflight", "1")
    async with (
        scheduler(nats_server.url, *one, instance="s1"),
        scheduler(nats_server.url, *one, instance="s2"),
    ):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "long", "prompt": "a"}', timeout=10)
        )
        while not pending.done():
            held = [len(await _sessions(nc, f"{SESSIONS_SUBJECT}.{name}")) for name in ("s1", "s2")]
            assert sum(held) <= 1, f"the job was handed to a second scheduler while the first worked: {held}"
            await asyncio.sleep(0.25)
        assert json.loads((await pending).data)["text"] == "A" and len(draft.jobs) == 1


# --- deadlines ----------------------------------------------------------------------------------------------


async def test_timeout_s_becomes_the_deadline_and_is_clamped_to_the_cap(nats_server, nc):
    draft = await FakeDraft(nc).start()
    async with scheduler(nats_server.url, "--request-timeout", "30"):
        t0 = time.time()
        await nc.request("draftwire.prompts", b'{"prompt": "a", "timeout_s": 2.5}', timeout=5)
        await nc.request("draftwire.prompts", b'{"prompt": "b", "timeout_s": 1e9}', timeout=5)
        await nc.request("draftwire.prompts", b'{"prompt": "c"}', timeout=5)
        a, b, c = (j.deadline - t0 for j in draft.jobs)
        assert 2.5 <= a < 3.5 and 30 <= b < 31 and 30 <= c < 31


async def test_a_draft_that_never_finishes_gives_deadline_exceeded(nats_server, nc):
    draft = await FakeDraft(nc, "hang").start()
    async with scheduler(nats_server.url):
        t0 = time.monotonic()
        msg = await nc.request(
            "draftwire.prompts", msgpack.packb({"id": "stuck", "prompt": "x", "timeout_s": 1}), timeout=10
        )
        elapsed = time.monotonic() - t0
        body = msgpack.unpackb(msg.data)
        assert body["id"] == "stuck" and body["error"]["code"] == "deadline_exceeded"
        assert 1 + DEADLINE_GRACE_S - 0.5 <= elapsed < 1 + DEADLINE_GRACE_S + 2, elapsed
        assert draft.pings >= 2, "the scheduler kept checking the session"
        await _jobs_empty(nc)


async def test_no_draft_instance_until_the_deadline_gives_no_draft(nats_server, nc):
    async with scheduler(nats_server.url):
        t0 = time.monotonic()
        msg = await nc.request(
            "draftwire.prompts", b'{"id": "lonely", "prompt": "x", "timeout_s": 1}', timeout=8
        )
        assert json.loads(msg.data)["error"]["code"] == "no_draft"
        assert 0.9 <= time.monotonic() - t0 < 3
        await _jobs_empty(nc)


async def test_a_job_waits_for_a_draft_instance_to_appear(nats_server, nc):
    async with scheduler(nats_server.url, instance="sched-wait"):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "patient", "prompt": "wait"}', timeout=8)
        )
        await asyncio.sleep(1.0)
        (session,) = await _sessions(nc)
        assert (
            session["id"] == "patient" and session["state"] == "waiting_for_draft" and session["age_s"] > 0.5
        )
        assert 590 < session["deadline_in_s"] <= 600 and len(session["session"]) == 16
        assert [s["id"] for s in await _sessions(nc, f"{SESSIONS_SUBJECT}.sched-wait")] == ["patient"]
        draft = await FakeDraft(nc).start()
        assert json.loads((await pending).data)["text"] == "WAIT" and len(draft.jobs) == 1
        await _jobs_empty(nc)
        await _until(lambda: _no_sessions(nc), 2, "the session list to empty")


async def _no_sessions(nc) -> bool:
    return not await _sessions(nc)


async def test_draft_errors_are_forwarded_as_they_are(nats_server, nc):
    await FakeDraft(nc, "reject").start()
    async with scheduler(nats_server.url):
        msg = await nc.request("draftwire.prompts", b'{"id": "e1", "prompt": "x"}', timeout=5)
        assert json.loads(msg.data) == {
            "id": "e1",
            "error": {"code": "context_length_exceeded", "message": "prompt too long"},
        }
        await _jobs_empty(nc)


# --- cancel -------------------------------------------------------------------------------------------------


async def test_cancel_of_a_queued_job_answers_it_at_once_without_running_it(nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()
    async with scheduler(nats_server.url, "--max-inflight", "1"):
        running = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "r1", "prompt": "a"}', timeout=8)
        )
        await asyncio.wait_for(draft.received.wait(), 5)
        queued = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "q1", "prompt": "b"}', timeout=8)
        )
        await _until(lambda: _stored(nc, 2), what="the second job stored")
        t0 = time.monotonic()
        await nc.publish(SUBJECTS.cancel("q1"), b"")
        body = json.loads((await queued).data)
        assert body == {"id": "q1", "error": {"code": "cancelled", "message": "the request was cancelled"}}
        assert time.monotonic() - t0 < 1 and not running.done()
        draft.release.set()
        assert json.loads((await running).data)["text"] == "A"
        await _jobs_empty(nc)
        assert [j.id for j in draft.jobs] == ["r1"], "the cancelled job never reached a draft"


async def test_cancel_of_a_job_waiting_for_a_draft_answers_it_at_once(nats_server, nc):
    async with scheduler(nats_server.url):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "w1", "prompt": "a"}', timeout=8)
        )
        await _until(lambda: _state(nc, "waiting_for_draft"), what="the job to wait for a draft")
        t0 = time.monotonic()
        await nc.publish(SUBJECTS.cancel("w1"), b"")
        assert json.loads((await pending).data)["error"]["code"] == "cancelled"
        assert time.monotonic() - t0 < 1
        await _jobs_empty(nc)


async def _state(nc, state: str) -> bool:
    return any(s["state"] == state for s in await _sessions(nc))


async def test_cancel_of_a_running_job_relays_the_drafts_partial_result(nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()
    async with scheduler(nats_server.url):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "c1", "prompt": "a"}', timeout=8)
        )
        await asyncio.wait_for(draft.received.wait(), 5)
        await nc.publish(SUBJECTS.cancel("c1"), b"")
        body = json.loads((await pending).data)
        assert body["error"]["code"] == "cancelled" and body["text"] == "PART", body


async def test_a_running_job_whose_draft_ignores_the_cancel_is_answered_cancelled_after_a_grace(
    nats_server, nc
):
    await FakeDraft(nc, "hang", cancels=False).start()
    async with scheduler(nats_server.url):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "c2", "prompt": "a"}', timeout=10)
        )
        await _until(lambda: _state(nc, "running"), what="the job to run")
        t0 = time.monotonic()
        await nc.publish(SUBJECTS.cancel("c2"), b"")
        assert json.loads((await pending).data)["error"]["code"] == "cancelled"
        assert CANCEL_GRACE_S <= time.monotonic() - t0 < CANCEL_GRACE_S + 2


async def test_a_job_fetched_after_its_cancel_never_runs(nats_server, nc):
    draft = await FakeDraft(nc).start()
    async with scheduler(nats_server.url) as sched:
        # the cancel came first (from a host whose clock runs a little ahead); the job is fetched after it
        sched.cancels.add("late", time.time() + 0.5)
        msg = await nc.request("draftwire.prompts", b'{"id": "late", "prompt": "a"}', timeout=5)
        assert json.loads(msg.data)["error"]["code"] == "cancelled" and draft.jobs == []


def test_a_cancel_is_remembered_for_a_job_fetched_later_but_not_for_a_later_request():
    cancels = RecentCancels(ttl=10, max_entries=2)
    cancels.add("a", now=100.0)
    assert cancels.applies("a", accepted_at=99.0, now=105.0), "accepted before the cancel"
    assert cancels.applies("a", accepted_at=100.5, now=105.0), "clock slack between hosts"
    assert not cancels.applies("a", accepted_at=102.0, now=105.0), "a new request that reuses the id"
    assert not cancels.applies("a", accepted_at=99.0, now=110.5), "expired"
    assert not cancels.applies("b", accepted_at=99.0, now=105.0)
    cancels.add("b", now=101.0)
    cancels.add("c", now=102.0)
    assert len(cancels) == 2 and not cancels.applies("a", 99.0, 103.0), "bounded: the oldest goes"
    cancels.add("d", now=115.0)
    assert len(cancels) == 1, "expired entries are pruned"


# --- fire-and-forget ----------------------------------------------------------------------------------------


async def test_fire_and_forget_via_js_publish_delivers_on_the_results_subject(nats_server, nc):
    draft = await FakeDraft(nc).start()
    results = await _results(nc)
    async with scheduler(nats_server.url):
        js = nc.jetstream()
        body = json.dumps({"id": "ff1", "prompt": "fire"}).encode()
        ack = await js.publish(SUBJECTS.submit, body, headers={"Nats-Msg-Id": "ff1"})
        assert ack.stream == SUBMIT_STREAM
        assert (await js.publish(SUBJECTS.submit, body, headers={"Nats-Msg-Id": "ff1"})).duplicate, "deduped"
        await js.publish(SUBJECTS.submit, json.dumps({"id": "ff2", "prompt": "x", "top_p": 9}).encode())
        got = {}
        for _ in range(2):
            msg = await asyncio.wait_for(results.get(), 5)
            got[msg.subject] = json.loads(msg.data)
        assert got[SUBJECTS.results("ff1")]["text"] == "FIRE"
        assert got[SUBJECTS.results("ff2")]["error"]["code"] == "bad_param"
        assert [j.id for j in draft.jobs] == ["ff1"]
        await _jobs_empty(nc)
        await _jobs_empty(nc, SUBMIT_STREAM)


async def test_a_submission_made_while_no_scheduler_runs_is_served_when_one_starts(nats_server, nc):
    async with scheduler(nats_server.url):
        pass  # creates the streams, as `draftwire up` does before the services
    results = await _results(nc, SUBJECTS.results("early"))
    await nc.jetstream().publish(SUBJECTS.submit, b'{"id": "early", "prompt": "queued"}')
    await FakeDraft(nc).start()
    async with scheduler(nats_server.url):
        assert json.loads((await asyncio.wait_for(results.get(), 5)).data)["text"] == "QUEUED"


# --- failover -----------------------------------------------------------------------------------------------


async def test_a_dead_draft_is_replaced_and_the_job_runs_again_in_the_same_session(nats_server, nc):
    first = await FakeDraft(nc, "hang", instance="draft-a").start()
    async with scheduler(nats_server.url):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "d1", "prompt": "again"}', timeout=10)
        )
        await asyncio.wait_for(first.received.wait(), 5)
        second = await FakeDraft(nc, instance="draft-b").start()
        await first.die()
        t0 = time.monotonic()
        body = json.loads((await pending).data)
        assert body["text"] == "AGAIN" and body["stats"]["draft_instance"] == "draft-b"
        assert time.monotonic() - t0 < 4, "two missed pings half a second apart, then a new dispatch"
        assert first.jobs[0].session == second.jobs[0].session, "same job, same session: same seeded output"
        assert first.jobs[0] == second.jobs[0]


async def test_a_job_whose_draft_died_resumes_after_the_tokens_it_had_committed(nats_server, nc):
    first = await FakeDraft(nc, "hang", instance="draft-a").start()
    first.generated = [11, 12, 13]
    async with scheduler(nats_server.url):
        pending = asyncio.ensure_future(
            nc.request(
                "draftwire.prompts", b'{"id": "r1", "prompt": "again", "max_new_tokens": 8}', timeout=10
            )
        )
        await asyncio.wait_for(first.received.wait(), 5)
        await _until(lambda: _pinged(first), what="a session ping that reports progress")
        second = await FakeDraft(nc, instance="draft-b").start()
        await first.die()
        assert json.loads((await pending).data)["stats"]["draft_instance"] == "draft-b"
        assert first.jobs[0].resume == () and second.jobs[0].resume == (11, 12, 13)
        assert replace(second.jobs[0], resume=()) == first.jobs[0]


async def _pinged(draft) -> bool:
    return draft.pings > 0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"generated": [1, 2, 3]}, (1, 2, 3)),
        ({"generated": []}, ()),
        ({"round": 1}, None),
        ({"generated": [1, -2]}, None),
        ({"generated": [1, True]}, None),
        ({"generated": list(range(9))}, None),  # more than max_new_tokens
        ({"generated": "123"}, None),
        ([1, 2], None),
    ],
)
def test_session_progress_takes_only_a_well_formed_token_list(answer, expected):
    assert session_progress(msgpack.packb(answer), 8) == expected
    assert session_progress(b"\xc1 not msgpack", 8) is None


async def test_a_stopped_scheduler_hands_its_job_over_and_the_next_one_attaches_to_the_draft(nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()
    replies = await _results(nc, "_INBOX.handover")
    await flush(nc)
    async with scheduler(nats_server.url, instance="sched-a"):
        await nc.publish("draftwire.prompts", b'{"id": "redo", "prompt": "again"}', reply="_INBOX.handover")
        await asyncio.wait_for(draft.received.wait(), 5)
    # scheduler A stopped mid-generation: the job is still stored and was handed back at once (nak)
    assert (await nc.jetstream().stream_info(JOBS_STREAM)).state.messages == 1 and replies.empty()
    async with scheduler(nats_server.url, instance="sched-b"):
        await _until(lambda: _state(nc, "running"), what="sched-b to attach")
        draft.release.set()
        msg = await asyncio.wait_for(replies.get(), 5)
        assert json.loads(msg.data)["text"] == "AGAIN"
        await _jobs_empty(nc)
    assert [j.id for j in draft.jobs] == ["redo"], "attached to the running draft, not dispatched again"
    assert replies.empty()


async def test_only_the_scheduler_that_creates_the_delivered_key_replies(nats_server, nc):
    replies = await _results(nc, "_INBOX.once.*")
    async with scheduler(nats_server.url, instance="s1") as a, scheduler(nats_server.url, instance="s2") as b:
        job = GenerateJob("x1", "p", _params(), SpecParams(), session="ab" * 16)
        record = JobRecord(job, "_INBOX.once.1", time.time())
        sent = await asyncio.gather(
            a._deliver_once(record, {"text": "a"}), b._deliver_once(record, {"text": "b"})
        )
        assert sorted(sent) == [False, True]
        await asyncio.sleep(0.2)
        assert replies.qsize() == 1


def _params() -> SamplingParams:
    return SamplingParams()


# --- reply safety: one reply, one run ----------------------------------------------------------------------


@pytest.mark.parametrize("lost", [1, STORE_TRIES], ids=["one-puback-lost", "every-puback-lost"])
async def test_a_job_stored_despite_lost_pubacks_is_answered_exactly_once(nats_server, nc, lost):
    draft = await FakeDraft(nc, "hold").start()
    replies = await _results(nc, "_INBOX.lossy")
    results = await _results(nc, SUBJECTS.results("pa"))
    async with scheduler(nats_server.url) as sched:
        real, msg_ids = sched.js.publish, []

        async def lossy(subject, payload=b"", **kw):
            ack = await real(subject, payload, **kw)
            if subject.startswith("draftwire.jobs."):
                msg_ids.append(kw["headers"]["Nats-Msg-Id"])
                if len(msg_ids) <= lost:
                    raise nats.errors.TimeoutError  # stored, but the PubAck never came
            return ack

        sched.js.publish = lossy
        await nc.publish("draftwire.prompts", b'{"id": "pa", "prompt": "once"}', reply="_INBOX.lossy")
        if lost == STORE_TRIES:  # given up: claimed, then answered; the stored job must stay silent
            body = json.loads((await asyncio.wait_for(replies.get(), 5)).data)
            assert body["error"]["code"] == "unavailable"
            draft.release.set()
        else:
            await _until(lambda: _stored(nc, 1), what="the job stored")
            draft.release.set()
            assert json.loads((await asyncio.wait_for(replies.get(), 5)).data)["text"] == "ONCE"
        await _jobs_empty(nc)
        await asyncio.sleep(0.5)
        assert replies.empty() and results.qsize() == 1, "exactly one reply, and one copy on results.<id>"
        assert len(msg_ids) == min(lost + 1, STORE_TRIES) and len(set(msg_ids)) == 1, msg_ids
        info = await nc.jetstream().stream_info(JOBS_STREAM)
        assert info.state.last_seq == 1 and info.config.duplicate_window == 120, "every try stored it once"


async def test_a_redelivered_submission_makes_the_same_job_and_is_answered_once(nats_server, nc):
    draft = await FakeDraft(nc).start()
    js = nc.jetstream()
    await ensure_submit_stream(js)
    await ensure_jobs_stream(js)
    results = await _results(nc, SUBJECTS.results("sub1"))
    await js.publish(SUBJECTS.submit, b'{"id": "sub1", "prompt": "once"}')
    (submission,) = await (await submit_subscription(js)).fetch(1, timeout=2)  # the scheduler never sees it
    async with scheduler(nats_server.url) as sched:
        await sched._take_submission(submission)
        assert json.loads((await asyncio.wait_for(results.get(), 5)).data)["text"] == "ONCE"
        await _jobs_empty(nc)
        await sched._take_submission(submission)  # delivered again (its ack was lost): the same job, deduped
        await asyncio.sleep(1.0)
        assert results.empty() and len(draft.jobs) == 1
        meta = submission.metadata
        assert draft.jobs[0].session == submission_session(meta.sequence.stream, meta.timestamp)


def test_a_submission_session_is_the_same_at_every_delivery_and_unique_per_submission():
    t = datetime(2030, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
    one = submission_session(7, t)
    assert one == submission_session(7, t) and len(one) == 16 and int(one, 16) >= 0
    assert one != submission_session(8, t), "another submission"
    assert one != submission_session(7, t + timedelta(microseconds=1)), "a recreated stream reusing seq 7"


async def test_a_failing_results_copy_never_turns_into_a_second_reply(nats_server, nc, monkeypatch):
    replies = await _results(nc, "_INBOX.answer")
    real = bus.publish

    async def flaky(client, subject, payload, headers=None):
        if subject.startswith("draftwire.results."):
            raise nats.errors.ConnectionClosedError
        await real(client, subject, payload, headers)

    monkeypatch.setattr(bus, "publish", flaky)
    async with scheduler(nats_server.url):
        bad = json.dumps({"id": "bad-2", "prompt": "x", "top_p": 7}).encode()
        await nc.publish("draftwire.prompts", bad, reply="_INBOX.answer")
        msg = await asyncio.wait_for(replies.get(), 5)
        assert json.loads(msg.data)["error"]["code"] == "bad_param"
        await asyncio.sleep(0.5)
        assert replies.empty(), "nats.micro answered the handler's exception with a second reply"


async def test_a_queued_cancel_whose_answer_fails_is_answered_when_the_job_is_fetched(nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()
    async with scheduler(nats_server.url, "--max-inflight", "1") as sched:
        running = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "r2", "prompt": "a"}', timeout=8)
        )
        await asyncio.wait_for(draft.received.wait(), 5)
        queued = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "q2", "prompt": "b"}', timeout=8)
        )
        await _until(lambda: _stored(nc, 2), what="the second job stored")
        real, failed = sched.delivered.create, []

        async def flaky(key, value):
            if not failed:
                failed.append(key)
                raise nats.errors.TimeoutError  # the KV bucket did not answer this once
            return await real(key, value)

        sched.delivered.create = flaky
        await nc.publish(SUBJECTS.cancel("q2"), b"")
        await _until(lambda: _true(failed), what="the cancel's failed answer")
        draft.release.set()
        assert json.loads((await running).data)["text"] == "A"
        assert json.loads((await queued).data)["error"]["code"] == "cancelled", "the job was kept, not lost"
        await _jobs_empty(nc)
        assert [j.id for j in draft.jobs] == ["r2"]


async def _true(value) -> bool:
    return bool(value)


async def test_a_draft_that_finishes_just_before_the_first_ping_is_not_run_again(
    nats_server, nc, monkeypatch
):
    async with scheduler(nats_server.url):
        pass  # the streams
    draft = await FakeDraft(nc, "hold").start()
    job = GenerateJob("race", "p", _params(), SpecParams(), session="cd" * 16, deadline=time.time() + 30)
    await nc.request(SUBJECTS.draft_start, job.encode(), timeout=2)  # a draft runs it; its scheduler died
    replies = await _results(nc, "_INBOX.race")
    await nc.jetstream().publish(SUBJECTS.jobs("race"), JobRecord(job, "_INBOX.race", time.time()).encode())
    real = Scheduler._stored_result

    async def racing(self, w):  # the draft finishes right after the scheduler's first look for the result
        body = await real(self, w)
        if body is None and not draft.release.is_set():
            draft.release.set()
            await _until(lambda: _true(draft.finished), what="the draft to finish")
        return body

    monkeypatch.setattr(Scheduler, "_stored_result", racing)
    async with scheduler(nats_server.url):
        assert json.loads((await asyncio.wait_for(replies.get(), 5)).data)["text"] == "P"
        await _jobs_empty(nc)
    assert len(draft.jobs) == 1, "dispatched again although the result was there"


async def test_a_job_whose_reply_was_claimed_already_is_acked_without_running(nats_server, nc):
    draft = await FakeDraft(nc).start()
    async with scheduler(nats_server.url) as sched:
        replies = await _results(nc, "_INBOX.claimed")
        job = GenerateJob("gone", "p", _params(), SpecParams(), session="ef" * 16, deadline=time.time() + 30)
        await sched.delivered.create(job.session, b"intake")  # say the intake gave up and answered for it
        await nc.jetstream().publish(
            SUBJECTS.jobs("gone"), JobRecord(job, "_INBOX.claimed", time.time()).encode()
        )
        await _jobs_empty(nc)
        await asyncio.sleep(0.3)
        assert draft.jobs == [] and replies.empty()


# --- processes ----------------------------------------------------------------------------------------------


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DRAFTWIRE_"))}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


async def _spawn_scheduler(url: str, instance: str, env: dict | None = None):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "draftwire.services.scheduler",
        "--nats",
        url,
        "--instance",
        instance,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or _env(),
        cwd=REPO,
    )
    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
    assert line.startswith(f"{READY_PREFIX} scheduler instance={instance}"), line
    return proc


@pytest.mark.parametrize(
    "draft_s, sig",
    [(6.0, signal.SIGKILL), (1.0, signal.SIGKILL), (6.0, signal.SIGSTOP)],
    ids=["killed-replacement-attaches", "killed-replacement-finds-the-stored-result", "paused-then-resumed"],
)
async def test_a_scheduler_that_dies_mid_job_is_replaced_and_the_requester_gets_exactly_one_reply(
    nats_server, nc, draft_s, sig
):
    # SIGSTOP is the harder case: the paused scheduler wakes up after its replacement replied, still holding
    # the job and the draft's done message, and must not reply a second time.
    draft = await FakeDraft(nc, delay=draft_s).start()
    names = ("sk-1", "sk-2")
    procs = [await _spawn_scheduler(nats_server.url, name) for name in names]
    try:
        replies = await _results(nc, "_INBOX.failover")
        await nc.publish("draftwire.prompts", b'{"id": "k1", "prompt": "survive"}', reply="_INBOX.failover")
        await asyncio.wait_for(draft.received.wait(), 5)
        (holder,) = [p for p, name in zip(procs, names) if await _sessions(nc, f"{SESSIONS_SUBJECT}.{name}")]
        holder.send_signal(sig)
        msg = await asyncio.wait_for(replies.get(), draft_s + 8)
        assert json.loads(msg.data)["text"] == "SURVIVE"
        if sig == signal.SIGSTOP:
            holder.send_signal(signal.SIGCONT)
        await asyncio.sleep(2.0)
        assert replies.empty(), "exactly one reply"
        assert len(draft.jobs) == 1, "the replacement attached or found the result: no second run"
        await _jobs_empty(nc)
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            await p.wait()


async def test_trace_context_goes_from_the_user_through_the_scheduler_to_the_draft(nats_server, nc):
    draft = await FakeDraft(nc).start()
    async with scheduler(nats_server.url):
        headers = {"traceparent": f"00-{TRACE_ID}-{USER_SPAN}-01"}
        await nc.request("draftwire.prompts", b"traced", timeout=5, headers=headers)
        (sent,) = draft.headers
        assert sent["traceparent"].split("-")[1] == TRACE_ID


async def test_subprocess_scheduler_serves_traces_and_stops_on_sigterm(nats_server, nc, otlp_receiver):
    draft = await FakeDraft(nc).start()
    env = _env(
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="50",
        DRAFTWIRE_DEFAULT_GAMMA="5",
    )
    proc = await _spawn_scheduler(nats_server.url, "sched-sub", env)
    stderr = b""
    try:
        headers = {"traceparent": f"00-{TRACE_ID}-{USER_SPAN}-01"}
        msg = await nc.request(
            "draftwire.prompts", b'{"id": "sub-1", "prompt": "hi"}', timeout=5, headers=headers
        )
        assert json.loads(msg.data)["text"] == "HI" and draft.jobs[0].spec.gamma == 5, (
            "DRAFTWIRE_DEFAULT_GAMMA"
        )

        spans = await otlp_receiver.wait_for(lambda s: any(x.name == "scheduler.request" for x in s), 10)
        span = next(s for s in spans if s.name == "scheduler.request")
        assert span.service_name == "draftwire-scheduler" and span.kind == SpanKind.CONSUMER.value + 1
        assert (span.trace_id, span.parent_span_id) == (TRACE_ID, USER_SPAN)
        assert span.attributes["draftwire.request_id"] == "sub-1"
        assert (span.attributes["draftwire.mode"], span.attributes["draftwire.gamma"]) == ("tkslt", 5)
        assert draft.headers[0]["traceparent"].split("-")[1:3] == [TRACE_ID, span.span_id]

        ping = json.loads((await nc.request("$SRV.PING.draftwire-scheduler", b"", timeout=2)).data)
        assert ping["metadata"]["instance"] == "sched-sub"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, stderr.decode()
    assert b"stopping" in stderr


async def test_bad_flags_exit_with_a_message(nats_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "draftwire.services.scheduler",
        "--nats",
        nats_server.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(DRAFTWIRE_DEFAULT_GAMMA="0"),
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode != 0 and b"gamma" in err and READY_PREFIX.encode() not in out


# --- the functional core ------------------------------------------------------------------------------------


def test_defaults_from_args_validates():
    ok = build_parser().parse_args(["--default-mode", "ar", "--default-k", "2"])
    assert defaults_from_args(ok) == SpecParams(mode="ar", gamma=4, k=2)
    for flags in (["--default-gamma", "0"], ["--request-timeout", "0"], ["--max-inflight", "0"]):
        with pytest.raises(SystemExit):
            defaults_from_args(build_parser().parse_args(flags))


def test_draft_result_and_start_outcome():
    ok = draft_result(msgpack.packb({"id": "x", "text": "t", "stats": {}}), None, "r")
    assert ok == {"id": "r", "text": "t", "stats": {}}
    assert draft_result(b"\xc1", None, "r")["error"]["code"] == "draft_error"
    assert draft_result(msgpack.packb([1]), None, "r")["error"]["code"] == "draft_error"
    failed = draft_result(b"", {"Nats-Service-Error": "boom", "Nats-Service-Error-Code": "500"}, "r")
    assert failed["error"]["code"] == "draft_error" and "boom" in failed["error"]["message"]
    assert start_outcome(msgpack.packb({"accepted": True, "instance": "d"}), None, "r") is None
    rejected = msgpack.packb({"error": {"code": "context_length_exceeded", "message": "m"}})
    assert start_outcome(rejected, None, "r")["error"]["code"] == "context_length_exceeded"
    assert start_outcome(msgpack.packb({"accepted": 1}), None, "r")["error"]["code"] == "draft_error"


def test_sessions_snapshot_orders_by_age():
    def work(rid: str, started: float, state: str) -> Work:
        job = GenerateJob(rid, "p", _params(), SpecParams(), session=rid * 4, deadline=200.0)
        return Work(record=JobRecord(job, None, 100.0), msg=None, started=started, state=state)

    assert sessions_snapshot(
        [work("a", 10.0, "running"), work("b", 5.0, "received")], now=12.0, wall=150.0
    ) == [
        {"id": "b", "session": "bbbb", "state": "received", "age_s": 7.0, "deadline_in_s": 50.0},
        {"id": "a", "session": "aaaa", "state": "running", "age_s": 2.0, "deadline_in_s": 50.0},
    ]


# --- placement by load --------------------------------------------------------------------------------------


async def _loaded_verifier(nc, instance: str, sessions: int):
    """A verifier as the scheduler sees one: a `draftwire-verifier` micro service that reports its load."""
    ctx = ServiceContext(name="verifier", instance=instance, args=None, nc=nc, tracer=None)

    async def verify(req):
        await req.respond(b"")

    return await register(ctx, "draftwire-verifier", "fake",
                          [(SUBJECTS.verify_instance(instance), verify, instance)],
                          stats=lambda: {"sessions": sessions, "queue": 0, "busy": 0, "max_queue": 64})


async def _ask(nc, rid: str) -> dict:
    msg = await nc.request("draftwire.prompts", json.dumps({"id": rid, "prompt": rid}).encode(), timeout=10)
    return json.loads(msg.data)


async def test_new_jobs_go_to_the_least_loaded_draft_and_name_the_least_loaded_verifier(nats_server, nc):
    busy = await FakeDraft(nc, instance="draft-busy", load=3).start()
    idle = await FakeDraft(nc, instance="draft-idle", load=0).start()
    await _loaded_verifier(nc, "v-busy", sessions=4)
    await _loaded_verifier(nc, "v-idle", sessions=0)
    async with scheduler(nats_server.url):
        for i in range(3):  # 0, 1, 2 sessions placed on the idle one: still fewer than the other's 3
            assert (await _ask(nc, f"p{i}"))["stats"]["draft_instance"] == "draft-idle"
    assert not busy.jobs and idle.subjects == [SUBJECTS.draft_start_instance("draft-idle")] * 3
    assert [job.verifier for job in idle.jobs] == ["v-idle"] * 3


async def test_a_burst_of_jobs_counts_the_sessions_it_placed_and_spreads(nats_server, nc):
    busy = await FakeDraft(nc, "hold", instance="draft-busy", load=2).start()
    idle = await FakeDraft(nc, "hold", instance="draft-idle", load=0).start()
    async with scheduler(nats_server.url):
        pending = [asyncio.ensure_future(_ask(nc, f"b{i}")) for i in range(6)]
        await _until(lambda: _true(len(busy.jobs) + len(idle.jobs) == 6), what="six jobs placed")
        busy.release.set()
        idle.release.set()
        await asyncio.gather(*pending)
    # loads 0 and 2, six sessions: four and two, give or take a gathering in the middle of the burst
    assert 1 <= len(busy.jobs) <= 3, (len(busy.jobs), len(idle.jobs))


async def test_with_no_draft_reporting_a_load_jobs_still_run_through_the_queue_group(nats_server, nc):
    old = await FakeDraft(nc, instance="draft-old").start()  # an older draft: no micro stats, no own subject
    await _loaded_verifier(nc, "v-idle", sessions=0)
    async with scheduler(nats_server.url):
        assert (await _ask(nc, "q1"))["text"] == "Q1"
    assert old.subjects == [SUBJECTS.draft_start]
    assert old.jobs[0].verifier is None  # an older draft would refuse the field


async def test_a_draft_gone_since_it_reported_its_load_is_left_for_another(nats_server, nc):
    other = await FakeDraft(nc, instance="draft-other", load=4).start()
    idle = await FakeDraft(nc, instance="draft-idle", load=0).start()
    async with scheduler(nats_server.url):
        assert (await _ask(nc, "g1"))["stats"]["draft_instance"] == "draft-idle"
        await idle.die()  # within the half second the loads are kept: the next job is placed on it first
        t0 = time.monotonic()
        assert (await _ask(nc, "g2"))["stats"]["draft_instance"] == "draft-other"
        # "no responders" at once, then the next least-loaded draft; not a wait for the next gathering
        assert time.monotonic() - t0 < 0.25
    assert other.subjects == [SUBJECTS.draft_start_instance("draft-other")]
