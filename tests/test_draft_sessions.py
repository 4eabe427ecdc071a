"""The draft and verifier services' session lifecycle on a real nats-server, real SmolLM2, services as processes.

Drives the draft service directly (`draftwire.draft.start`, then the result on `draftwire.done.<session>`), as
the scheduler does, so these tests do not depend on the scheduler. Covers (docs/sessions.md): the immediate
start reply and the stored result, a repeated start that runs nothing twice, the `offset` of streamed chunks,
cancel and deadline stopping within a round with the partial text, the context bound answered in well under
a second, the verifier freeing a session's KV cache when it ends, and a verifier SIGKILLed mid-generation
costing well under the 15 s verify timeout with the output unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import subprocess
import sys
import time
import uuid

import msgpack
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client

from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import GenerateJob
from draftwire.shared.io.bus import SUBJECTS, ensure_done_stream
from draftwire.shared.io.nats_server import EmbeddedNats, _die_with_parent
from draftwire.shared.io.service_shell import READY_PREFIX

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "def fibonacci(n):"
MODEL = "smollm2-135m"
READY_S = 300.0
LONG = 4000  # tokens: far more than any test lets run
FROZEN_S = 0.5  # the failover test freezes the victim this long before the kill


class Services:
    """Service processes started as `draftwire up` starts them; `instances[key]` is each one's instance name."""

    def __init__(self, url: str, logs) -> None:
        self.url = url
        self.logs = logs  # a directory: each process's stderr, quoted when it fails to start
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.instances: dict[str, str] = {}
        self._drains: list[asyncio.Task] = []

    async def spawn(self, key: str, service: str, *flags: str) -> None:
        log = self.logs / f"{key}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"draftwire.services.{service}", "--nats", self.url, "--torch-threads", "1", *flags,
                stdout=subprocess.PIPE, stderr=err, preexec_fn=_die_with_parent,
            )
        self.procs[key] = proc
        try:
            line = await asyncio.wait_for(_ready_line(proc), READY_S)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{key} did not start: {exc}\n{log.read_text()[-3000:]}") from None
        self.instances[key] = line.split("instance=", 1)[1].split()[0]
        self._drains.append(asyncio.create_task(_drain(proc)))

    async def kill(self, key: str) -> None:
        self.procs[key].send_signal(signal.SIGKILL)
        await self.procs[key].wait()

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self._drains:
            task.cancel()


async def _ready_line(proc) -> str:
    while line := (await proc.stdout.readline()).decode(errors="replace"):
        if line.startswith(READY_PREFIX):
            return line
    raise RuntimeError(f"service exited with {await proc.wait()} before it was ready")


async def _drain(proc) -> None:
    while await proc.stdout.readline():
        pass


def verifier_flags() -> list[str]:
    return ["--target-model", MODEL, "--target-dtype", "fp32"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(tmp_path_factory):
    async with EmbeddedNats(store_dir=tmp_path_factory.mktemp("js")) as server:
        svc = Services(server.url, tmp_path_factory.mktemp("logs"))
        try:
            await asyncio.gather(
                svc.spawn("verifier", "verifier", *verifier_flags()),
                svc.spawn("draft", "draft", "--draft-model", MODEL, "--draft-dtype", "int8"),
            )
            yield svc
        finally:
            await svc.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(services):
    nc = Client()
    await nc.connect(services.url)
    await ensure_done_stream(nc.jetstream())
    yield nc
    await nc.close()


def make_job(n: int = 32, *, prompt: str = PROMPT, deadline: float = 0.0, stream: bool = False) -> GenerateJob:
    session = uuid.uuid4().hex
    return GenerateJob(
        id=f"r{session[:12]}", prompt=prompt, params=SamplingParams(max_new_tokens=n, min_new_tokens=n),
        spec=SpecParams(mode="tkslt", gamma=4, k=8), stream=stream, format="msgpack", session=session,
        deadline=deadline,
    )


async def start_job(nc: Client, job: GenerateJob) -> tuple[dict, asyncio.Future]:
    """Start `job`; returns the start reply and a future of the body stored on `draftwire.done.<session>`."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_done(msg) -> None:
        if not done.done():
            done.set_result(msgpack.unpackb(msg.data))

    sub = await nc.subscribe(SUBJECTS.done(job.session), cb=on_done)
    done.add_done_callback(lambda _f: asyncio.ensure_future(sub.unsubscribe()))
    reply = msgpack.unpackb((await nc.request(SUBJECTS.draft_start, job.encode(), timeout=30)).data)
    if not reply.get("accepted"):
        done.cancel()
    return reply, done


async def session_round(nc: Client, session: str) -> int | None:
    """The round the draft reports for `session`; None once nobody runs it ("no responders")."""
    try:
        msg = await nc.request(SUBJECTS.draft_session(session), b"", timeout=1.0)
    except nats.errors.NoRespondersError:
        return None
    return msgpack.unpackb(msg.data)["round"]


async def wait_rounds(nc: Client, session: str, at_least: int, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = await session_round(nc, session)
        assert r is not None, "the session ended before it was cancelled"
        if r >= at_least:
            return r
        await asyncio.sleep(0.05)
    raise AssertionError(f"session {session} did not reach round {at_least}")


async def verifier_info(nc: Client) -> dict:
    return msgpack.unpackb((await nc.request(SUBJECTS.verifier_info, b"", timeout=10)).data)


# --- tests ------------------------------------------------------------------------------------------------------


async def test_verifier_describes_the_target(client):
    info = await verifier_info(client)
    assert info["model"] == MODEL and info["vocab_size"] == 49152 and info["context_length"] == 8192
    assert info["eos_token_ids"] and all(isinstance(t, int) for t in info["eos_token_ids"])


async def test_start_is_answered_at_once_and_the_result_is_stored_on_done(services, client):
    job = make_job(32, stream=True)
    chunks: list[dict] = []
    events: list[dict] = []
    csub = await client.subscribe(SUBJECTS.stream(job.id), cb=functools.partial(_append, chunks))
    esub = await client.subscribe(SUBJECTS.events_request, cb=functools.partial(_append, events))
    t0 = time.monotonic()
    reply, done = await start_job(client, job)
    assert time.monotonic() - t0 < 1.0
    assert reply == {"accepted": True, "instance": services.instances["draft"]}
    again = msgpack.unpackb((await client.request(SUBJECTS.draft_start, job.encode(), timeout=10)).data)
    assert again == reply  # the same session again: accepted, not run twice
    body = await asyncio.wait_for(done, 120)
    await asyncio.sleep(0.3)
    await csub.unsubscribe()
    await esub.unsubscribe()
    assert "error" not in body, body
    assert len(body["token_ids"]) == 32 and body["stats"]["session"] == job.session
    assert [e["request_id"] for e in events].count(job.id) == 1  # one run, one request event
    stored = await client.jetstream().get_last_msg("DRAFTWIRE_DONE", SUBJECTS.done(job.session))
    assert msgpack.unpackb(stored.data)["token_ids"] == body["token_ids"]
    assert await session_round(client, job.session) is None  # no longer served once the result is stored
    # streamed chunks: each one's offset is the number of tokens before it, and together they are the result
    parts = [c for c in chunks if not c["done"]]
    assert [c["offset"] for c in parts] == [sum(len(p["token_ids"]) for p in parts[:i]) for i in range(len(parts))]
    assert [t for c in parts for t in c["token_ids"]] == body["token_ids"]
    assert "".join(c["text"] for c in parts) == body["text"] and chunks[-1]["done"] is True


async def _append(items, msg):
    items.append(msgpack.unpackb(msg.data))


async def test_verifier_frees_the_session_when_the_generation_ends(client):
    before = (await verifier_info(client))["sessions"]
    _, done = await start_job(client, make_job(16))
    body = await asyncio.wait_for(done, 120)
    assert "error" not in body, body
    sessions = None
    for _ in range(40):  # the close is published before the result is stored: it lands within moments
        sessions = (await verifier_info(client))["sessions"]
        if sessions == before:
            break
        await asyncio.sleep(0.05)
    assert sessions == before


async def test_cancel_stops_within_one_round_and_returns_the_partial_text(client):
    a, b = make_job(LONG), make_job(LONG)
    (ra, done_a), (rb, done_b) = await start_job(client, a), await start_job(client, b)
    assert ra["accepted"] and rb["accepted"]
    await wait_rounds(client, a.session, 3)
    await wait_rounds(client, b.session, 3)  # two sessions share the model thread: both advance
    at_cancel = await session_round(client, a.session)
    await client.publish(SUBJECTS.cancel(a.id), b"")
    body = await asyncio.wait_for(done_a, 30)
    assert body["error"]["code"] == "cancelled", body
    assert 0 < len(body["token_ids"]) < LONG and body["text"]
    assert body["stats"]["rounds"] <= at_cancel + 2  # the round in flight when the cancel came, at most one more
    assert await session_round(client, b.session) is not None  # the other request goes on
    rounds = (await verifier_info(client))["rounds"]
    await client.publish(SUBJECTS.cancel(b.id), b"")
    body_b = await asyncio.wait_for(done_b, 30)
    assert body_b["error"]["code"] == "cancelled"
    await asyncio.sleep(0.5)  # a round sent before the cancel may still be queued at the verifier
    settled = (await verifier_info(client))["rounds"]
    await asyncio.sleep(1.0)
    assert (await verifier_info(client))["rounds"] == settled <= rounds + 3  # the verifier saw no more rounds


async def test_session_pings_are_answered_while_the_model_works(client):
    """Model work runs off the event loop: a long prompt's prefill does not delay pings (or cancels)."""
    before = (await verifier_info(client))["prefill_chunks"]
    job = make_job(LONG, prompt=" ".join(["hello"] * 3000))
    reply, done = await start_job(client, job)
    assert reply["accepted"]
    worst, t_end = 0.0, time.monotonic() + 2.0
    while time.monotonic() < t_end:
        t = time.monotonic()
        assert await session_round(client, job.session) is not None
        worst = max(worst, time.monotonic() - t)
        await asyncio.sleep(0.02)
    chunks = (await verifier_info(client))["prefill_chunks"]
    await client.publish(SUBJECTS.cancel(job.id), b"")
    assert (await asyncio.wait_for(done, 30))["error"]["code"] == "cancelled"
    assert worst < 0.25, worst
    # The prefills stop within a chunk of the cancel (chunked on both sides): a short job that drafts (2 tokens:
    # one drafted) waits for the model threads, tells when it did, and the next test starts on idle services.
    _, after = await start_job(client, make_job(2))
    assert "error" not in await asyncio.wait_for(after, 60)
    total = (await verifier_info(client))["prefill_chunks"]
    assert total > before and total - chunks <= 2, (chunks, total)  # the edge's prefill: chunked, then stopped


async def test_deadline_stops_the_generation_with_the_partial_text(client):
    deadline = time.time() + 2.0
    reply, done = await start_job(client, make_job(LONG, deadline=deadline))
    assert reply["accepted"]
    body = await asyncio.wait_for(done, 30)
    late = time.time() - deadline
    assert body["error"]["code"] == "deadline_exceeded", body
    assert 0 < len(body["token_ids"]) < LONG and body["text"], (late, body)
    assert late < 1.0, late  # within a round of the deadline


async def test_a_job_past_its_deadline_is_refused_without_work(client):
    t0 = time.monotonic()
    reply, _ = await start_job(client, make_job(16, deadline=time.time() - 1))
    assert reply["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("words, n", [(9000, 16), (1, 1 << 20)], ids=["long-prompt", "huge-max-new-tokens"])
async def test_context_bound_is_answered_in_under_a_second(client, words, n):
    t0 = time.monotonic()
    reply, _ = await start_job(client, make_job(n, prompt=" ".join(["hello"] * words)))
    elapsed = time.monotonic() - t0
    assert reply["error"]["code"] == "context_length_exceeded", reply
    assert "8192" in reply["error"]["message"] and str(n) in reply["error"]["message"]
    assert elapsed < 1.0, elapsed


async def test_verifier_sigkill_mid_generation_fails_over_fast_with_identical_output(services, client):
    await services.spawn("verifier-2", "verifier", *verifier_flags())
    n = 48
    t0 = time.monotonic()
    _, done = await start_job(client, make_job(n))
    clean = await asyncio.wait_for(done, 120)
    clean_s = time.monotonic() - t0
    assert "error" not in clean, clean

    job = make_job(n)
    serving: asyncio.Future = asyncio.get_running_loop().create_future()

    rounds_at: list[float] = []  # when each of the job's rounds was reported

    async def on_round(msg) -> None:
        event = msgpack.unpackb(msg.data)
        if event["request_id"] != job.id:
            return
        rounds_at.append(time.monotonic())
        if event["round"] >= 2 and not serving.done():
            serving.set_result(event["verifier_instance"])

    sub = await client.subscribe(SUBJECTS.events_round, cb=on_round)
    t0 = time.monotonic()
    _, done = await start_job(client, job)
    victim = await asyncio.wait_for(serving, 60)
    key = next(k for k, v in services.instances.items() if v == victim)
    # Freeze it first, so the next round is surely in flight at the victim when it dies (a kill between
    # rounds is answered "no responders" by the request itself and would not exercise the liveness ping).
    services.procs[key].send_signal(signal.SIGSTOP)
    await asyncio.sleep(FROZEN_S)
    await services.kill(key)
    killed_at = time.monotonic()
    body = await asyncio.wait_for(done, 120)
    faulted_s = time.monotonic() - t0
    await sub.unsubscribe()
    assert "error" not in body, body
    assert body["token_ids"] == clean["token_ids"]
    assert body["stats"]["failovers"] >= 1 and body["stats"]["verifier_instances"][0] == victim
    stall = min(t for t in rounds_at if t > killed_at) - killed_at  # the kill to the next round's verdict
    print(f"verifier SIGKILL mid-round: {clean_s:.2f}s clean, {faulted_s:.2f}s with the kill ({FROZEN_S}s frozen "
          f"before it); the next round came {stall:.2f}s after the kill")
    assert stall < 3.0, stall  # the verify timeout is 15 s: this is the ping's "no responders" at work
