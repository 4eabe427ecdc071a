"""Infrastructure tests against a real nats-server and a real OTLP/HTTP receiver (no mocks)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NoOpTracer, SpanKind

from draftwire.shared.io import tracing
from draftwire.shared.io.bus import (
    DONE_STREAM,
    JOBS_CONSUMER,
    JOBS_STREAM,
    SUBJECTS,
    SUBMIT_STREAM,
    connect,
    ensure_done_stream,
    ensure_jobs_stream,
    ensure_submit_stream,
    extract_context,
    flush,
    inject_headers,
    jobs_subscription,
    request,
    validate_token,
)
from draftwire.shared.io.nats_server import (
    DEFAULT_MAX_PAYLOAD,
    EmbeddedNats,
    is_reachable,
    nats_server_binary,
)
from draftwire.shared.io.service_shell import ServiceContext, register
from tests.nats_fixtures import *
from tests.otlp_receiver import *

REPO = Path(__file__).resolve().parents[1]


def _pid_alive(pid: int) -> bool:
    """Running, i.e. neither reaped nor a zombie (an orphan's zombie waits for init, which may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: fall back to signal 0, which also counts zombies as alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


async def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# --- (a) embedded server ---------------------------------------------------------------------------------


def test_binary_is_found():
    assert nats_server_binary().is_file()


async def test_embedded_nats_jetstream_roundtrip_and_clean_stop(tmp_path):
    server = EmbeddedNats(store_dir=tmp_path / "js")
    await server.start()
    pid = server.pid
    assert server.url.startswith("nats://127.0.0.1:") and await is_reachable(server.url)
    nc = await connect(server.url, name="t")
    try:
        assert nc.max_payload == DEFAULT_MAX_PAYLOAD

        async def echo(msg):
            await msg.respond(msg.data)

        await nc.subscribe("big", cb=echo)
        big = os.urandom(3 * 1024 * 1024)  # > the 1 MB server default: `full`-mode payloads must fit
        assert (await nc.request("big", big, timeout=5)).data == big
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        ack = await js.publish("t.one", b"hello")
        assert ack.stream == "T" and ack.seq == 1
        sub = await js.pull_subscribe("t.>", durable="d", stream="T")
        (msg,) = await sub.fetch(1, timeout=2)
        assert msg.data == b"hello"
        await msg.ack_sync()
        assert (await js.consumer_info("T", "d")).num_ack_pending == 0
    finally:
        await nc.close()
        await server.stop()
    assert await _wait_gone(pid, 1.0), "nats-server still running after stop()"
    assert not await is_reachable(server.url, timeout=0.3)
    assert (tmp_path / "js").exists(), "an explicit store_dir must survive stop()"


def test_up_keeps_jetstream_state_per_port_and_a_random_port_run_keeps_none(monkeypatch, tmp_path):
    """`up` on a fixed port finds the jobs queued while it was down; demo, bench and loadtest (random port)
    start from nothing, or a killed run's jobs still in the stream refuse the next run's ids (`duplicate_id`)."""
    from draftwire.services.cli.stack import jetstream_store

    monkeypatch.setenv("DRAFTWIRE_CACHE", str(tmp_path))
    assert jetstream_store(4222) == str(tmp_path / "nats" / "4222")
    assert jetstream_store(4222, cluster=3) == str(tmp_path / "nats" / "cluster3-4222")
    assert jetstream_store(None) is None and jetstream_store(0) is None
    assert jetstream_store(None, cluster=3) is None


async def test_server_dies_with_its_parent(tmp_path):
    """kill -9 of the parent (no stop(), no atexit) must not leave an orphan nats-server."""
    script = (
        "import asyncio, sys\n"
        "from draftwire.shared.io.nats_server import EmbeddedNats\n"
        "async def main():\n"
        "    s = await EmbeddedNats().start()\n"
        "    print(s.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=REPO,
        env=_subprocess_env(TMPDIR=str(tmp_path)),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(parent.stdout.readline(), 15)
        child = int(line)
        assert _pid_alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        await parent.wait()
    assert await _wait_gone(child, 5.0), f"orphaned nats-server pid {child}"


async def test_connect_to_missing_server_fails_fast():
    async with EmbeddedNats() as server:
        url = server.url
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="not reachable"):
        await connect(url, name="t", initial_timeout=1.0)
    assert time.monotonic() - t0 < 3


async def test_port_in_use_fails_with_server_log():
    async with EmbeddedNats() as first:
        with pytest.raises(RuntimeError, match="address already in use"):
            await EmbeddedNats(port=first.port, startup_timeout=5).start()
        assert await is_reachable(first.url)


async def test_connect_handshake_failure_is_bounded():
    async with EmbeddedNats(extra_args=["--user", "u", "--pass", "p"]) as server:
        with pytest.raises(ConnectionError, match="Authorization Violation"):
            await connect(server.url, name="t", initial_timeout=0.5)


async def test_flush_returns_after_the_server_has_a_subscription_made_just_before(nats_server, nc):
    """What a ready line promises: once `flush` returns, another client's request finds the new subscriber.
    (nats-py's own `Client.flush()` lets its PING overtake the pending SUB; this fails with it within ~100 tries.)"""
    other = await connect(nats_server.url, name="requester")

    async def answer(msg) -> None:
        await msg.respond(b"ok")

    try:
        for i in range(400):
            sub = await nc.subscribe(f"t.flush.{i}", queue="q", cb=answer)
            await flush(nc)
            assert (await other.request(f"t.flush.{i}", b"", timeout=5)).data == b"ok", i
            await sub.unsubscribe()
    finally:
        await other.close()


# --- (b) job queue ----------------------------------------------------------------------------------------


async def test_job_waits_for_a_consumer_unacked_is_redelivered_and_one_per_id_is_in_flight(nc):
    js = nc.jetstream()
    info = await ensure_jobs_stream(js, ack_wait=1.0)
    assert info.name == JOBS_CONSUMER and info.config.ack_wait == pytest.approx(1.0)
    await js.publish(SUBJECTS.jobs("a"), b"job-a")  # nobody consumes yet: the stream keeps it
    with pytest.raises(nats.js.errors.APIError) as refused:  # a second job with that id while one is queued
        await js.publish(SUBJECTS.jobs("a"), b"job-a2")
    assert refused.value.err_code == 10077 and "per subject" in refused.value.description
    sub = await jobs_subscription(js)

    (first,) = await sub.fetch(1, timeout=2)
    assert first.data == b"job-a" and first.metadata.num_delivered == 1
    # not acked (say the scheduler died): JetStream redelivers after ack_wait
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=0.3)
    (second,) = await sub.fetch(1, timeout=3)
    assert second.data == b"job-a" and second.metadata.num_delivered == 2
    await second.ack_sync()
    assert (await js.stream_info(JOBS_STREAM)).state.messages == 0, "work queue: the ack deletes the job"
    await js.publish(SUBJECTS.jobs("a"), b"job-a3")  # and frees the id


async def test_ensure_streams_are_idempotent_and_update(nc):
    js = nc.jetstream()
    await ensure_jobs_stream(js, ack_wait=30)
    info = await ensure_jobs_stream(js, ack_wait=4, max_msgs=10)
    assert info.config.ack_wait == pytest.approx(4)
    assert (await js.stream_info(JOBS_STREAM)).config.max_msgs == 10
    for _ in range(2):
        await ensure_submit_stream(js)
        await ensure_done_stream(js)
    first, again = [await js.publish(SUBJECTS.submit, b"x", headers={"Nats-Msg-Id": "m1"}) for _ in range(2)]
    assert first.stream == SUBMIT_STREAM and again.duplicate, "PubAcks on, Nats-Msg-Id dedupe"
    assert (await js.stream_info(DONE_STREAM)).config.max_msgs_per_subject == 1


# --- (c) micro ---------------------------------------------------------------------------------------------


async def test_micro_service_answers_srv_ping_info_stats(nc):
    async def echo(req):
        await req.respond(b"echo:" + req.data)

    ctx = ServiceContext(name="verifier", instance="v1", args=None, nc=nc, tracer=None)
    svc = await register(ctx, "dw-verifier", "test verifier", [(SUBJECTS.verify, echo, "verifiers")])
    try:
        reply = await nc.request(SUBJECTS.verify, b"hi", timeout=2)
        assert reply.data == b"echo:hi"

        ping = json.loads((await nc.request("$SRV.PING.dw-verifier", b"", timeout=2)).data)
        assert (
            ping["name"] == "dw-verifier" and ping["id"] == svc.id and ping["type"].endswith("ping_response")
        )
        info = json.loads((await nc.request(f"$SRV.INFO.dw-verifier.{svc.id}", b"", timeout=2)).data)
        assert info["description"] == "test verifier"
        assert info["endpoints"] == [
            {"name": "verify", "subject": SUBJECTS.verify, "queue_group": "verifiers", "metadata": None}
        ]
        stats = json.loads((await nc.request("$SRV.STATS", b"", timeout=2)).data)
        assert stats["endpoints"][0]["num_requests"] == 1
    finally:
        await svc.stop()


# --- (d) trace propagation across processes -------------------------------------------------------------

_RESPONDER = """
import asyncio, sys
from opentelemetry.trace import SpanKind
from draftwire.shared.io.bus import connect, extract_context
from draftwire.shared.io.service_shell import ServiceContext, register
from draftwire.shared.io.tracing import setup_tracing, shutdown_tracing

async def main(url):
    tracer = setup_tracing("dw-test-responder", instance="r1")
    nc = await connect(url, "responder")
    done = asyncio.Event()

    async def handle(req):
        with tracer.start_as_current_span("respond", context=extract_context(req.headers), kind=SpanKind.SERVER):
            await req.respond(b"pong:" + req.data)
        done.set()

    ctx = ServiceContext(name="responder", instance="r1", args=None, nc=nc, tracer=tracer)
    await register(ctx, "dw-test-responder", "test", [("draftwire.test.ping", handle, "q")])
    print("READY", flush=True)
    await asyncio.wait_for(done.wait(), 20)
    await nc.drain()
    shutdown_tracing()

asyncio.run(main(sys.argv[1]))
"""


async def test_trace_context_crosses_nats_and_processes(nc, nats_server, otlp_receiver, monkeypatch):
    responder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RESPONDER, nats_server.url, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env=_subprocess_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_receiver.endpoint, OTEL_EXPORTER_OTLP_COMPRESSION="gzip"),
    )  # fmt: skip
    try:
        assert (await asyncio.wait_for(responder.stdout.readline(), 20)).strip() == b"READY"
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)
        tracer = tracing.setup_tracing("dw-test-requester", instance="q1")
        assert tracing.setup_tracing("dw-test-requester", instance="q1") is not None  # idempotent
        try:
            with tracer.start_as_current_span("ask", kind=SpanKind.CLIENT):
                reply = await request(nc, "draftwire.test.ping", b"x", timeout=5)
        finally:
            # off the loop: the flush is a blocking HTTP POST to the receiver that runs on this very loop
            await asyncio.to_thread(tracing.shutdown_tracing)
        assert reply.data == b"pong:x"
        assert await asyncio.wait_for(responder.wait(), 20) == 0
    finally:
        if responder.returncode is None:
            responder.kill()
            await responder.wait()

    def both(spans):
        return {s.name for s in spans} >= {"ask", "respond"}

    spans = {s.name: s for s in await otlp_receiver.wait_for(both, timeout=10)}
    ask, respond = spans["ask"], spans["respond"]
    assert ask.service_name == "dw-test-requester" and respond.service_name == "dw-test-responder"
    assert respond.resource["service.instance.id"] == "r1"
    assert ask.trace_id == respond.trace_id and len(ask.trace_id) == 32
    assert respond.parent_span_id == ask.span_id and ask.parent_span_id == ""
    assert respond.kind == SpanKind.SERVER.value + 1  # OTLP enum is offset by SPAN_KIND_UNSPECIFIED=0


def test_inject_extract_roundtrip_is_case_insensitive():
    tracer = TracerProvider().get_tracer("t")  # local provider: leaves the global one alone
    with tracer.start_as_current_span("s") as span:
        headers = inject_headers({"x-app": "1"})
    assert headers["x-app"] == "1" and headers["traceparent"].startswith("00-")
    want = span.get_span_context()
    for carrier in (headers, {"Traceparent": headers["traceparent"]}):
        from opentelemetry import trace

        got = trace.get_current_span(extract_context(carrier)).get_span_context()
        assert (got.trace_id, got.span_id, got.is_remote) == (want.trace_id, want.span_id, True)
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid


def test_tracing_disabled_without_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    tracer = tracing.setup_tracing("dw-off")
    assert isinstance(tracer, NoOpTracer) and not tracing._providers
    with tracer.start_as_current_span("nothing"):
        assert "traceparent" not in inject_headers()
    tracing.shutdown_tracing()


# --- (e) subjects ------------------------------------------------------------------------------------------


def test_subjects_are_built_and_validated():
    assert SUBJECTS.prompts == "draftwire.prompts" and SUBJECTS.verify == "draftwire.verify"
    assert SUBJECTS.stream("r-42") == "draftwire.stream.r-42"
    assert SUBJECTS.verify_instance("gpu_0") == "draftwire.verify.gpu_0"
    assert SUBJECTS.draft_start == "draftwire.draft.start"
    assert SUBJECTS.events_round == "draftwire.events.round"
    assert SUBJECTS.events_request == "draftwire.events.request"
    for bad in ("", "a.b", "a b", "a*", "x>", "tab\there", "x" * 300):
        with pytest.raises(ValueError, match="id|token|long"):
            SUBJECTS.stream(bad)
    with pytest.raises(ValueError, match="verifier instance 'v.1'.*'\\.'"):
        SUBJECTS.verify_instance("v.1")
    with pytest.raises(ValueError):
        validate_token(None)  # type: ignore[arg-type]


async def test_dump_stacks_shows_each_task_s_chain_of_awaits_and_each_thread():
    """What SIGUSR1 logs: a stalled task must show where it waits, down to the innermost await."""
    from draftwire.shared.io.service_shell import dump_stacks

    parked = asyncio.Event()

    async def wait_for_a_verdict_that_never_comes():
        await parked.wait()

    async def session_loop():
        await wait_for_a_verdict_that_never_comes()

    task = asyncio.create_task(session_loop(), name="stalled-session")
    await asyncio.sleep(0)
    try:
        text = dump_stacks()
    finally:
        task.cancel()
    chain = text.split("--- task stalled-session", 1)[1].split("---", 1)[0]
    assert "in session_loop" in chain and "in wait_for_a_verdict_that_never_comes" in chain
    assert "--- thread MainThread" in text
