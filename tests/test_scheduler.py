"""Scheduler against a real nats-server (JetStream on) and a fake draft responder: the user-facing contract.

The fake draft serves `draftwire.draft.start` in the `drafts` queue group like the real one, and answers
with a canned result derived from the job, so these tests need no model and run in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import msgpack
import nats.errors
import pytest
from opentelemetry.trace import NoOpTracer, SpanKind

from services.scheduler.service import (
    SESSIONS_SUBJECT,
    Captured,
    ReplyBook,
    Scheduler,
    build_job,
    build_parser,
    defaults_from_args,
    draft_result,
    reply_key,
    resolve_sampling,
    resolve_spec,
    sessions_snapshot,
    start,
)
from shared.core.params import SpecParams
from shared.core.prompt_request import GenerateJob, PromptRequest
from shared.io.bus import (
    PROMPT_STREAM,
    REPLY_CLAIMS_BUCKET,
    SUBJECTS,
    connect,
    ensure_prompt_stream,
    ensure_reply_claims,
)
from shared.io.service_shell import READY_PREFIX, ServiceContext
from tests.nats_fixtures import *
from tests.otlp_receiver import *

REPO = Path(__file__).resolve().parents[1]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
USER_SPAN = "00f067aa0ba902b7"


# --- helpers ------------------------------------------------------------------------------------------------


class FakeDraft:
    """Stands in for the draft service: records each job and its headers, then answers as `behaviour` says."""

    def __init__(self, nc, behaviour: str = "echo") -> None:
        self.nc, self.behaviour = nc, behaviour
        self.jobs: list[GenerateJob] = []
        self.headers: list[dict] = []
        self.received = asyncio.Event()
        self.release = asyncio.Event()
        self._sub = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> FakeDraft:
        self._sub = await self.nc.subscribe(SUBJECTS.draft_start, queue="drafts", cb=self._on_job)
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        for t in self._tasks:
            t.cancel()

    async def _on_job(self, msg) -> None:
        task = asyncio.create_task(self._answer(msg))  # like the real draft: one task per job
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg) -> None:
        job = GenerateJob.decode(msg.data)
        self.jobs.append(job)
        self.headers.append(dict(msg.headers or {}))
        self.received.set()
        if self.behaviour == "hang":
            return
        if self.behaviour == "hold":
            await self.release.wait()
        if self.behaviour == "error":
            body = {
                "id": job.id,
                "error": {"code": "no_verifier", "message": "no verifier answered for 120s"},
            }
        else:
            body = _canned(job)
        await msg.respond(msgpack.packb(body))


def _canned(job: GenerateJob) -> dict:
    return {
        "id": job.id,
        "text": job.prompt.upper(),
        "token_ids": list(job.prompt.encode())[:16],
        "finish_reason": "length",
        "stats": {
            "rounds": 2,
            "drafted": 8,
            "accepted": 6,
            "acceptance_rate": 0.75,
            "mean_accepted_per_round": 3.0,
            "uplink_bytes": 100,
            "downlink_bytes": 20,
            "wall_s": 0.01,
            "tokens_per_s": 800.0,
            "mode": job.spec.mode,
            "gamma": job.spec.gamma,
            "k": job.spec.k,
            "seed": job.params.seed,
            "draft_instance": "fake-draft",
            "verifier_instances": ["fake-verifier"],
        },
    }


@contextlib.asynccontextmanager
async def scheduler(url: str, *flags: str, instance: str = "sched-test"):
    """The scheduler in this process, started and stopped the way shared.io.service_shell runs it."""
    args = build_parser().parse_args(["--nats", url, "--instance", instance, *flags])
    nc = await connect(url, name=f"draftwire-scheduler-{instance}")
    ctx = ServiceContext(name="scheduler", instance=instance, args=args, nc=nc, tracer=NoOpTracer())
    sched = await start(ctx)
    try:
        yield sched
    finally:
        for cleanup in reversed(ctx.cleanups):
            await cleanup()
        for svc in ctx.services:
            await svc.stop()
        await nc.drain()


async def _results(nc, subject: str = "draftwire.results.*"):
    got: asyncio.Queue = asyncio.Queue()

    async def cb(msg):
        await got.put(msg)

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    return got


async def _stream_empty(nc, timeout: float = 5.0) -> None:
    """Work-queue retention: an acked prompt is deleted, so an empty stream means everything was acked."""
    js = nc.jetstream()
    deadline = time.monotonic() + timeout
    while (n := (await js.stream_info(PROMPT_STREAM)).state.messages) != 0:
        assert time.monotonic() < deadline, f"{n} prompt(s) still unacked"
        await asyncio.sleep(0.05)


# --- the contract over NATS ---------------------------------------------------------------------------------


async def test_plain_text_request_gets_the_json_result_not_a_puback(nats_server, nc):
    draft = await FakeDraft(nc).start()
    results = await _results(nc)
    async with scheduler(nats_server.url):
        msg = await nc.request("draftwire.prompts", "héllo wörld".encode(), timeout=5)
        body = json.loads(msg.data)
        assert "seq" not in body and "stream" not in body, f"got a JetStream PubAck: {body}"
        assert body["text"] == "HÉLLO WÖRLD" and body["finish_reason"] == "length"
        assert body["token_ids"] == list("héllo wörld".encode())[:16]
        assert body["stats"]["acceptance_rate"] == 0.75 and body["stats"]["mode"] == "tkslt"
        assert msg.headers["Content-Type"] == "application/json"
        published = await asyncio.wait_for(results.get(), 5)
        assert published.subject == SUBJECTS.results(body["id"]) and json.loads(published.data) == body
        (job,) = draft.jobs
        assert job.id == body["id"] and job.format == "text" and (job.spec.gamma, job.spec.k) == (4, 8)
        assert 0 <= job.params.seed < 2**63
        await _stream_empty(nc)


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

        req = {"id": "m-1", "prompt": "xyz", "mode": "ar"}
        msg = await nc.request("draftwire.prompts", msgpack.packb(req), timeout=5)
        body = msgpack.unpackb(msg.data)
        assert body["id"] == "m-1" and body["text"] == "XYZ" and body["stats"]["mode"] == "ar"
        assert msg.headers["Content-Type"] == "application/msgpack" and draft.jobs[-1].format == "msgpack"

        # Content-Type decides: this JSON-looking body is a text prompt
        msg = await nc.request(
            "draftwire.prompts", b'{"prompt": 1}', timeout=5, headers={"Content-Type": "text/plain"}
        )
        assert json.loads(msg.data)["text"] == '{"PROMPT": 1}'


async def test_bad_requests_get_error_replies_and_the_next_request_still_works(nats_server, nc):
    draft = await FakeDraft(nc).start()
    results = await _results(nc)
    async with scheduler(nats_server.url):
        cases = [
            (b"\xc1\xff garbage \xfe", json.loads, "bad_encoding"),
            (msgpack.packb({"prompt": "x", "max_new_tokens": "many"}), msgpack.unpackb, "bad_param"),
            (msgpack.packb([1, 2, 3]), json.loads, "bad_encoding"),
            (json.dumps({"id": "bad-1", "prompt": "x", "top_p": 7}).encode(), json.loads, "bad_param"),
            (json.dumps({"prompt": "x", "tempreature": 1}).encode(), json.loads, "bad_request"),
            (b"a" * 1_000_000, json.loads, "oversize"),
        ]
        for data, decode, code in cases:
            msg = await nc.request("draftwire.prompts", data, timeout=5)
            err = decode(msg.data)["error"]
            assert err["code"] == code, (data[:40], err)
            assert err["message"]
        assert (
            "tempreature"
            in json.loads(
                (await nc.request("draftwire.prompts", b'{"prompt": "x", "tempreature": 1}', timeout=5)).data
            )["error"]["message"]
        )
        published = await asyncio.wait_for(results.get(), 5)  # only the error whose id was known
        assert published.subject == SUBJECTS.results("bad-1")
        assert json.loads(published.data) == {
            "id": "bad-1",
            "error": {"code": "bad_param", "message": "top_p must be in (0, 1], got 7.0"},
        }
        assert draft.jobs == [], "bad prompts never reach a draft"

        msg = await nc.request("draftwire.prompts", b"still alive?", timeout=5)
        assert json.loads(msg.data)["text"] == "STILL ALIVE?"
        await _stream_empty(nc)  # bad prompts were acked too: no poison redeliveries


async def test_prompt_published_while_no_scheduler_runs_is_served_when_one_starts(nats_server, nc):
    await ensure_prompt_stream(nc.jetstream())  # what `draftwire up` does before starting the services
    results = await _results(nc)
    await nc.publish("draftwire.prompts", json.dumps({"id": "early", "prompt": "queued"}).encode())
    await nc.publish("draftwire.prompts", b"plain and early")
    await nc.flush()
    await FakeDraft(nc).start()
    async with scheduler(nats_server.url):
        got = {}
        for _ in range(2):
            msg = await asyncio.wait_for(results.get(), 8)
            got[msg.subject] = json.loads(msg.data)
        assert got[SUBJECTS.results("early")]["text"] == "QUEUED"
        assert "PLAIN AND EARLY" in [b["text"] for b in got.values()]
        await _stream_empty(nc)


async def test_a_prompt_is_acked_only_after_its_result_was_delivered(nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()
    results = await _results(nc, SUBJECTS.results("redo"))
    async with scheduler(nats_server.url, instance="sched-a"):
        await nc.publish("draftwire.prompts", json.dumps({"id": "redo", "prompt": "again"}).encode())
        await asyncio.wait_for(draft.received.wait(), 5)
    # scheduler A stopped mid-generation: the prompt is still queued, and handed back at once (nak)
    assert (await nc.jetstream().stream_info(PROMPT_STREAM)).state.messages == 1
    assert results.empty()
    draft.release.set()
    async with scheduler(nats_server.url, instance="sched-b"):
        msg = await asyncio.wait_for(results.get(), 8)
        assert json.loads(msg.data)["text"] == "AGAIN"
        await _stream_empty(nc)
    assert [j.id for j in draft.jobs] == ["redo", "redo"]


async def test_a_draft_that_never_replies_gives_a_timeout_error(nats_server, nc):
    await FakeDraft(nc, "hang").start()
    async with scheduler(nats_server.url, "--request-timeout", "1"):
        t0 = time.monotonic()
        msg = await nc.request("draftwire.prompts", msgpack.packb({"id": "stuck", "prompt": "x"}), timeout=5)
        assert 1 <= time.monotonic() - t0 < 4
        body = msgpack.unpackb(msg.data)
        assert body["id"] == "stuck" and body["error"]["code"] == "timeout"
        assert "stuck for 1 s" in body["error"]["message"]
        await _stream_empty(nc)


async def test_draft_errors_are_forwarded_as_they_are(nats_server, nc):
    await FakeDraft(nc, "error").start()
    async with scheduler(nats_server.url):
        msg = await nc.request("draftwire.prompts", b'{"id": "e1", "prompt": "x"}', timeout=5)
        assert json.loads(msg.data) == {
            "id": "e1",
            "error": {"code": "no_verifier", "message": "no verifier answered for 120s"},
        }


async def test_a_prompt_waits_for_a_draft_instance_to_appear(nats_server, nc):
    async with scheduler(nats_server.url, instance="sched-wait"):
        pending = asyncio.ensure_future(
            nc.request("draftwire.prompts", b'{"id": "patient", "prompt": "wait"}', timeout=8)
        )
        await asyncio.sleep(1.0)
        info = json.loads((await nc.request(SESSIONS_SUBJECT, b"", timeout=2)).data)
        assert info["instance"] == "sched-wait"
        (session,) = info["sessions"]
        assert (
            session["id"] == "patient" and session["state"] == "waiting_for_draft" and session["age_s"] > 0.5
        )
        same = json.loads((await nc.request(f"{SESSIONS_SUBJECT}.sched-wait", b"", timeout=2)).data)
        assert [s["id"] for s in same["sessions"]] == ["patient"]
        await asyncio.sleep(1.0)
        draft = await FakeDraft(nc).start()
        body = json.loads((await pending).data)
        assert body["text"] == "WAIT" and len(draft.jobs) == 1
        await _stream_empty(nc)
        deadline = time.monotonic() + 2  # the session ends once the ack was confirmed, just after the reply
        while json.loads((await nc.request(SESSIONS_SUBJECT, b"", timeout=2)).data)["sessions"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)


async def test_identical_prompts_from_many_clients_to_several_schedulers_each_get_one_reply(nats_server, nc):
    # Identical payloads share a reply digest; both schedulers record every copy and must agree on who
    # answers whom, also when prompts queue up behind --max-inflight.
    await FakeDraft(nc).start()
    others = [await connect(nats_server.url, name=f"client-{i}") for i in range(4)]
    clients = [nc, *others]
    try:
        async with (
            scheduler(nats_server.url, "--max-inflight", "2", instance="s1"),
            scheduler(nats_server.url, "--max-inflight", "3", instance="s2"),
        ):
            payloads = [b"same prompt" if i % 3 else f"unique {i}".encode() for i in range(30)]
            replies = await asyncio.gather(
                *(
                    clients[i % len(clients)].request("draftwire.prompts", p, timeout=8)
                    for i, p in enumerate(payloads)
                )
            )
            bodies = [json.loads(r.data) for r in replies]
            assert [b["text"] for b in bodies] == [p.decode().upper() for p in payloads]
            assert len({b["id"] for b in bodies}) == 30
            await _stream_empty(nc)
    finally:
        for c in others:
            await c.close()


async def test_trace_context_goes_from_the_user_through_the_scheduler_to_the_draft(nats_server, nc):
    draft = await FakeDraft(nc).start()
    async with scheduler(nats_server.url):
        headers = {"traceparent": f"00-{TRACE_ID}-{USER_SPAN}-01"}
        await nc.request("draftwire.prompts", b"traced", timeout=5, headers=headers)
        (sent,) = draft.headers
        assert sent["traceparent"].split("-")[1] == TRACE_ID


async def test_subprocess_scheduler_serves_traces_and_stops_on_sigterm(nats_server, nc, otlp_receiver):
    draft = await FakeDraft(nc).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DRAFTWIRE_"))}
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="50",
        DRAFTWIRE_DEFAULT_GAMMA="5",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.scheduler",
        "--nats",
        nats_server.url,
        "--instance",
        "sched-sub",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    stderr = b""
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith(f"{READY_PREFIX} scheduler instance=sched-sub"), line

        headers = {"traceparent": f"00-{TRACE_ID}-{USER_SPAN}-01"}
        msg = await nc.request(
            "draftwire.prompts", b'{"id": "sub-1", "prompt": "hi"}', timeout=5, headers=headers
        )
        body = json.loads(msg.data)
        assert body["text"] == "HI" and draft.jobs[0].spec.gamma == 5, "DRAFTWIRE_DEFAULT_GAMMA applies"

        spans = await otlp_receiver.wait_for(lambda s: any(x.name == "scheduler.request" for x in s), 10)
        span = next(s for s in spans if s.name == "scheduler.request")
        assert span.service_name == "draftwire-scheduler" and span.kind == SpanKind.CONSUMER.value + 1
        assert (span.trace_id, span.parent_span_id) == (TRACE_ID, USER_SPAN)
        assert span.attributes["draftwire.request_id"] == "sub-1"
        assert (span.attributes["draftwire.mode"], span.attributes["draftwire.gamma"]) == ("tkslt", 5)
        assert span.attributes["draftwire.k"] == 8
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
    env = {**os.environ, "PYTHONPATH": str(REPO), "DRAFTWIRE_DEFAULT_GAMMA": "0"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.scheduler",
        "--nats",
        nats_server.url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode != 0 and b"gamma" in err and READY_PREFIX.encode() not in out


# --- the functional core ------------------------------------------------------------------------------------


def test_resolve_spec_and_sampling():
    defaults = SpecParams(mode="full", gamma=6, k=3)
    assert resolve_spec(PromptRequest("p", "i"), defaults) == defaults
    explicit = PromptRequest("p", "i", mode="ar", gamma=2, k=40, seed=9, temperature=0.3)
    assert resolve_spec(explicit, defaults) == SpecParams(mode="ar", gamma=2, k=40)
    assert resolve_sampling(explicit).seed == 9 and resolve_sampling(explicit).temperature == 0.3
    seeds = {resolve_sampling(PromptRequest("p", "i")).seed for _ in range(5)}
    assert len(seeds) == 5, "no seed -> a fresh one each time"
    job = build_job(PromptRequest("p", "i", stream=True), "msgpack", defaults, draw_seed=lambda: 123)
    assert (job.id, job.prompt, job.params.seed, job.spec, job.stream, job.format) == (
        "i",
        "p",
        123,
        defaults,
        True,
        "msgpack",
    )


def test_defaults_from_args_validates():
    ok = build_parser().parse_args(["--default-mode", "ar", "--default-k", "2"])
    assert defaults_from_args(ok) == SpecParams(mode="ar", gamma=4, k=2)
    for flags in (["--default-gamma", "0"], ["--request-timeout", "0"], ["--max-inflight", "0"]):
        with pytest.raises(SystemExit):
            defaults_from_args(build_parser().parse_args(flags))


def test_reply_key_ignores_header_order_case_and_nats_headers():
    k = reply_key({"A": "1", "b": "2"}, b"x")
    assert k == reply_key({"b": "2", "a": "1", "Nats-Msg-Id": "m"}, b"x")
    assert k != reply_key({"A": "1"}, b"x") and k != reply_key({"A": "1", "b": "2"}, b"y")
    assert reply_key(None, b"x") == reply_key({}, b"x")


def test_reply_book_matches_identical_prompts_by_arrival_order():
    # Two schedulers saw the same three identical prompts (r1, r2, r3 stored as seq 11, 12, 13); each is
    # handed some of them by the stream and must pick the same entry the other would.
    books = [ReplyBook(ttl=10, first_seq=11), ReplyBook(ttl=10, first_seq=11)]
    for book in books:
        book.calibrate(11)
        for i, reply in enumerate(["r1", "r2", "r3"]):
            book.record(b"k", reply, now=100.0 + i * 1e-4)
    assert books[1].claim(b"k", seq=12, stored_at=100.0, now=100.1).reply == "r2"
    assert books[0].claim(b"k", seq=13, stored_at=100.0, now=100.1).reply == "r3"
    assert books[0].claim(b"k", seq=11, stored_at=100.0, now=100.1).reply == "r1"
    assert books[0].claim(b"k", seq=13, stored_at=100.0, now=100.1).reply == "r3", (
        "a redelivery finds it again"
    )
    books[0].release(13)
    assert books[0].claim(b"other", seq=13, stored_at=100.0, now=100.1) is None


def test_reply_books_that_saw_different_orders_still_answer_each_requester_once():
    # NATS may hand two subscribers copies from different connections in different orders. Each book then
    # ranks the candidates differently; with a shared claim (the KV bucket, here a set) each requester wins
    # exactly one stream message.
    books = [ReplyBook(ttl=10, first_seq=11), ReplyBook(ttl=10, first_seq=11)]
    for book, order in zip(books, (["r1", "r2"], ["r2", "r1"])):
        book.calibrate(11)
        for i, reply in enumerate(order):
            book.record(b"k", reply, now=100.0 + i * 1e-4)
    claimed: dict[str, int] = {}

    def answer(book: ReplyBook, seq: int) -> str:
        for entry in book.candidates(b"k", seq, stored_at=100.0, now=100.1):
            if claimed.setdefault(entry.reply, seq) == seq:
                book.take(b"k", entry, seq, stored_at=100.0)
                return entry.reply
            book.drop(b"k", entry)
        raise AssertionError("no reply subject left")

    assert [e.reply for e in books[1].candidates(b"k", 12, 100.0, 100.1)] == ["r1", "r2"]  # it would pick r1
    first = answer(books[0], 11)
    second = answer(books[1], 12)
    assert first == "r1" and second == "r2"
    assert answer(books[1], 12) == "r2"  # a redelivery finds its entry again


async def test_reply_claims_are_exclusive_across_schedulers(nats_server, nc):
    js = nc.jetstream()
    claims = await ensure_reply_claims(js, ttl=60)
    assert (await (await ensure_reply_claims(js, ttl=30)).status()).bucket == REPLY_CLAIMS_BUCKET  # as it is
    a, b = (Scheduler(nc, NoOpTracer(), name, SpecParams(), 60.0, 2) for name in ("a", "b"))
    a._claims = b._claims = claims
    entry = Captured("_INBOX.requester.1", 0.0, 60.0, 0)
    assert await a._exclusive(entry, seq=7)
    assert not await b._exclusive(entry, seq=8)  # someone else's message: b must pick another requester
    assert await b._exclusive(entry, seq=7)  # the same message redelivered to b: still that requester
    assert await b._exclusive(Captured(None, 0.0, 60.0, 1), seq=9)  # nothing to claim without a reply


def test_reply_book_calibrates_on_unique_prompts_and_falls_back_to_time():
    book = ReplyBook(ttl=10, first_seq=1)
    book.record(b"a", "ra", now=100.0)
    book.record(b"k", "r1", now=101.0)
    book.record(b"k", "r2", now=105.0)
    book.record(b"k", None, now=106.0)  # a fire-and-forget copy of the same prompt
    assert book.offset is None
    assert book.claim(b"k", seq=52, stored_at=105.0, now=106.5).reply == "r2", "closest in time"
    assert book.claim(b"a", seq=50, stored_at=100.0, now=106.5).reply == "ra" and book.offset == 50
    assert book.claim(b"k", seq=53, stored_at=0.0, now=106.5).reply is None, "by index now, not time"
    assert book.claim(b"k", seq=51, stored_at=101.0, now=107.0).reply == "r1"
    assert book.claim(b"k", seq=54, stored_at=107.0, now=107.0) is None and len(book) == 0


def test_reply_book_expiry_capacity_and_prompts_from_before_it_listened():
    book = ReplyBook(ttl=10, first_seq=5, max_entries=3)
    book.record(b"old", "r", now=101.0)
    assert book.claim(b"old", seq=6, stored_at=101.0, now=111.5) is None, "expired"
    for i in range(5):
        book.record(b"k%d" % i, f"r{i}", now=102.0)
    assert len(book) == 3 and book.claim(b"k0", 7, 102.0, 103.0) is None
    book.record(b"early", "r", now=100.5)
    assert book.claim(b"early", seq=4, stored_at=100.5, now=100.6) is None, "stored before we listened"
    assert not book.may_arrive(seq=4, stored_at=100.5, now=100.6)
    assert book.may_arrive(seq=5, stored_at=100.5, now=101.0) and not book.may_arrive(5, 100.5, now=120.0)


def test_draft_result_normalises_the_draft_reply():
    ok = draft_result(msgpack.packb({"id": "x", "text": "t", "stats": {}}), None, "r")
    assert ok == {"id": "r", "text": "t", "stats": {}}
    assert draft_result(b"\xc1", None, "r")["error"]["code"] == "draft_error"
    assert draft_result(msgpack.packb([1]), None, "r")["error"]["code"] == "draft_error"
    failed = draft_result(b"", {"Nats-Service-Error": "boom", "Nats-Service-Error-Code": "500"}, "r")
    assert failed["error"]["code"] == "draft_error" and "boom" in failed["error"]["message"]


def test_sessions_snapshot_orders_by_age():
    from services.scheduler.service import Session

    a, b = (
        Session(seq=1, msg=None, started=10.0, state="generating", id="a"),
        Session(seq=2, msg=None, started=5.0),
    )
    assert sessions_snapshot([a, b], now=12.0) == [
        {"id": None, "seq": 2, "age_s": 7.0, "state": "received"},
        {"id": "a", "seq": 1, "age_s": 2.0, "state": "generating"},
    ]


def test_no_responders_error_is_what_nats_raises_without_a_draft():
    assert not issubclass(nats.errors.NoRespondersError, TimeoutError), "the scheduler tells the two apart"
