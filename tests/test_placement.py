"""Placement by load: the pure choice (shared/core/placement.py), the loads the instances report through
nats.micro's `$SRV.STATS` (shared/io/service_shell.register, shared/io/loads.py) against a real nats-server,
the job's `verifier` field, and the device's verifier choice (services/draft/verifier_link.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import replace

import msgpack
import nats.errors
import pytest

from draftwire.services.draft.verifier_link import VerifierDirectory
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.placement import Load, draft_load, least_loaded, verifier_load
from draftwire.shared.core.prompt_request import GenerateJob, RequestError
from draftwire.shared.io.bus import SUBJECTS, VERIFY_QUEUE, connect, flush
from draftwire.shared.io.loads import LoadBoard, gather_stats, parse_stats
from draftwire.shared.io.service_shell import ServiceContext, register
from tests.in_process import running
from tests.nats_fixtures import *

# --- the choice -------------------------------------------------------------------------------------------


def _draws(loads, n=200, **kw) -> set[str]:
    rng = random.Random(7)
    return {least_loaded(loads, rng, **kw).instance for _ in range(n)}


def test_the_least_loaded_instance_is_chosen_and_ties_are_shared():
    loads = [draft_load("a", {"active": 3, "max": 8}), draft_load("b", {"active": 0, "max": 8}),
             draft_load("c", {"active": 1, "max": 8})]
    assert _draws(loads) == {"b"}
    tied = [draft_load("a", {"active": 1, "max": 8}), draft_load("b", {"active": 1, "max": 8})]
    assert _draws(tied) == {"a", "b"}  # at random, so equal instances share a burst
    assert _draws(loads, exclude={"b"}) == {"c"}
    assert least_loaded([], random.Random()) is None
    assert least_loaded(loads[:1], random.Random(), exclude={"a"}) is None


def test_full_instances_are_skipped_and_unknown_load_is_the_last_resort_before_them():
    full = draft_load("full", {"active": 2, "max": 2})
    busy = draft_load("busy", {"active": 7, "max": 8})
    unknown = draft_load("old", None)
    assert full.full and not busy.full and unknown.key is None
    assert _draws([full, busy, unknown]) == {"busy"}  # room beats an idle-looking full one and an unknown
    assert _draws([full, unknown]) == {"old"}
    fuller = draft_load("fuller", {"active": 5, "max": 2})
    assert _draws([fuller, full]) == {"full"}  # every one full: the job still goes to the least loaded


def test_a_draft_with_more_slots_takes_more_sessions():
    small, big = draft_load("small", {"active": 1, "max": 2}), draft_load("big", {"active": 2, "max": 8})
    assert _draws([small, big]) == {"big"}


def test_sessions_placed_since_the_report_count_towards_the_load():
    assert draft_load("a", {"active": 1, "max": 4}, placed=3) == Load("a", (1.0, 4.0), full=True)
    idle, loaded = verifier_load("idle", {"sessions": 0, "queue": 0}, placed=3), verifier_load(
        "loaded", {"sessions": 2, "queue": 0})
    assert _draws([idle, loaded]) == {"loaded"}


def test_verifier_load_orders_sessions_then_queue_and_is_full_at_its_queue_limit():
    few = verifier_load("few", {"sessions": 1, "queue": 9, "busy": 40, "max_queue": 64})
    many = verifier_load("many", {"sessions": 4, "queue": 0, "busy": 0, "max_queue": 64})
    assert _draws([few, many]) == {"few"}
    tie = verifier_load("tie", {"sessions": 1, "queue": 2})
    assert _draws([few, tie]) == {"tie"}
    assert verifier_load("v", {"sessions": 1, "queue": 64, "max_queue": 64}).full
    assert not verifier_load("v", {"sessions": 1, "queue": 64}).full  # no limit reported: never full


@pytest.mark.parametrize("data", [None, [], {}, {"active": 1}, {"active": -1, "max": 4},
                                  {"active": True, "max": 4}, {"active": 1, "max": 0},
                                  {"active": 1.5, "max": 4},
                                  {"active": "1", "max": 4}])
def test_a_malformed_draft_report_is_an_unknown_load(data):
    assert draft_load("d", data) == Load("d")


@pytest.mark.parametrize("data", [None, {"sessions": 1}, {"queue": 1}, {"sessions": -1, "queue": 0}])
def test_a_malformed_verifier_report_is_an_unknown_load(data):
    assert verifier_load("v", data) == Load("v")


# --- the job's verifier field ------------------------------------------------------------------------------


def _job(**kw) -> GenerateJob:
    return GenerateJob("r1", "hi", SamplingParams(max_new_tokens=4), SpecParams(), session="s1", **kw)


def test_the_verifier_field_is_encoded_only_when_set_and_validated():
    assert "verifier" not in msgpack.unpackb(_job().encode())  # what an older draft decodes
    assert GenerateJob.decode(_job().encode()).verifier is None
    assert GenerateJob.decode(_job(verifier="edge-1").encode()).verifier == "edge-1"
    for bad in ("a.b", "", "x y", 7):
        obj = {**msgpack.unpackb(_job().encode()), "verifier": bad}
        with pytest.raises(RequestError) as err:
            GenerateJob.decode(msgpack.packb(obj))
        assert err.value.code == "bad_request" and "verifier" in str(err.value)
    with pytest.raises(RequestError):  # other unknown fields are still refused
        GenerateJob.decode(msgpack.packb({**msgpack.unpackb(_job().encode()), "verifierz": "v"}))


# --- reports through nats.micro ----------------------------------------------------------------------------


async def _service(nc, name: str, instance: str, stats=None):
    """A micro service as service_shell.register makes one, with one endpoint (data rides on endpoints)."""
    ctx = ServiceContext(name=name, instance=instance, args=None, nc=nc, tracer=None)

    async def info(req):
        await req.respond(b"{}")

    return await register(ctx, name, "test", [(f"test.{instance}.info", info, instance)], stats=stats)


async def test_register_reports_the_stats_callback_as_endpoint_data(nats_server, nc):
    await _service(nc, "draftwire-draft", "d1", stats=lambda: {"active": 2, "max": 4})
    reply = (await nc.request("$SRV.STATS.draftwire-draft", b"", timeout=2)).data
    assert json.loads(reply)["endpoints"][0]["data"] == {"active": 2, "max": 4}
    reported = parse_stats(reply)
    assert reported.instance == "d1" and reported.data == {"active": 2, "max": 4}


async def test_a_failing_stats_callback_still_answers_with_no_load(nats_server, nc):
    await _service(nc, "draftwire-draft", "d1", stats=lambda: 1 / 0)
    reported = parse_stats((await nc.request("$SRV.STATS.draftwire-draft", b"", timeout=2)).data)
    assert reported.instance == "d1" and reported.data is None


def test_parse_stats_refuses_replies_without_an_instance():
    assert parse_stats(b"not json") is None
    assert parse_stats(json.dumps({"id": "x", "metadata": {}}).encode()) is None
    assert parse_stats(json.dumps({"id": "x", "metadata": {"instance": "a.b"}}).encode()) is None


async def test_gathering_ends_once_the_instances_seen_before_answered(nats_server, nc):
    for i, active in enumerate((3, 0)):
        await _service(nc, "draftwire-draft", f"d{i}", stats=lambda a=active: {"active": a, "max": 8})
    t0 = time.monotonic()
    assert await gather_stats(nc, "draftwire-nobody", window=5.0, quiet=0.01) == {}  # no responders: at once
    found = await gather_stats(nc, "draftwire-draft", window=5.0, quiet=0.01, expect={"d0", "d1"})
    assert time.monotonic() - t0 < 1.0  # not the 5 s window
    assert {k: r.data for k, r in found.items()} == {"d0": {"active": 3, "max": 8},
                                                     "d1": {"active": 0, "max": 8}}
    board = LoadBoard(nc, "draftwire-draft", draft_load, rng=random.Random(1))
    assert (await board.choose()).instance == "d1"
    for _ in range(4):  # 4/8 now: past d0's 3/8
        board.placed("d1")
    assert (await board.choose()).instance == "d0"


# --- the device's verifier choice --------------------------------------------------------------------------


async def _verifier(url: str, instance: str, sessions: int):
    """A fake verifier: a `draftwire-verifier` micro service on its own connection that reports a load."""
    vnc = await connect(url, name=instance)
    ctx = ServiceContext(name="verifier", instance=instance, args=None, nc=vnc, tracer=None)

    async def verify(req):
        await req.respond(b"verdict")

    await register(ctx, "draftwire-verifier", "fake",
                   [(SUBJECTS.verify_instance(instance), verify, VERIFY_QUEUE)],
                   stats=lambda: {"sessions": sessions, "queue": 0, "busy": 0, "max_queue": 8})
    await flush(vnc)
    return vnc


async def test_the_device_takes_the_schedulers_verifier_while_known_else_the_least_loaded(nats_server, nc):
    conns = [await _verifier(nats_server.url, "v-busy", 5), await _verifier(nats_server.url, "v-idle", 1)]
    try:
        directory = VerifierDirectory(nc, rng=random.Random(3))
        assert [(await directory.pick(set()))[0] for _ in range(3)] == ["v-idle"] * 3  # 1, 2, 3 sessions < 5
        assert (await directory.pick(set(), prefer="v-busy"))[0] == "v-busy"  # the scheduler's choice
        assert (await directory.pick({"v-busy"}, prefer="v-busy"))[0] == "v-idle"  # it failed: our own choice
        assert (await directory.pick(set(), prefer="v-gone"))[0] == "v-idle"  # unknown, even after a refresh
        assert directory.ids.keys() == {"v-busy", "v-idle"}
    finally:
        for c in conns:
            await c.close()


# --- the real services, in process, with tiny models --------------------------------------------------------


async def _generate(nc, subject: str, job: GenerateJob) -> dict:
    sub = await nc.subscribe(SUBJECTS.done(job.session))
    reply = msgpack.unpackb((await nc.request(subject, job.encode(), timeout=10)).data)
    assert reply.get("accepted") is True, reply
    body = msgpack.unpackb((await sub.next_msg(timeout=30)).data)
    await sub.unsubscribe()
    return body


async def test_drafts_and_verifiers_report_their_load_and_a_draft_follows_the_placement(nats_server, nc):
    from draftwire.services.draft import service as draft
    from draftwire.services.verifier import service as verifier

    url, tiny = nats_server.url, ("--target-model", "tiny-random")
    async with (
        running(verifier, url, "va", *tiny, "--max-queue", "16"),
        running(verifier, url, "vb", *tiny, "--max-queue", "16"),
        running(draft, url, "d1", "--draft-model", "tiny-random", "--draft-dtype", "fp32",
                 "--max-concurrent", "3"),
    ):
        drafts = await gather_stats(nc, "draftwire-draft", window=2.0, quiet=0.05)
        assert drafts["d1"].data == {"active": 0, "max": 3}
        verifiers = await gather_stats(nc, "draftwire-verifier", window=2.0, quiet=0.05, expect={"va", "vb"})
        assert {k: r.data for k, r in verifiers.items()} == {
            v: {"sessions": 0, "queue": 0, "busy": 0, "max_queue": 16} for v in ("va", "vb")}
        # on d1's own start subject, as the scheduler sends it; on its own, d1 would alternate between the two
        for i, placed in enumerate(("vb", "vb", "va", "va")):
            job = replace(_job(verifier=placed), id=f"r{i}", session=f"s{i}")
            body = await _generate(nc, SUBJECTS.draft_start_instance("d1"), job)
            assert "error" not in body, body
            assert body["stats"]["draft_instance"] == "d1" and body["stats"]["verifier_instances"] == [placed]


async def test_a_verifier_whose_batch_loop_dies_stops_instead_of_swallowing_rounds(nats_server, nc, monkeypatch):
    """Rounds must never wait forever on a verifier that can no longer answer them."""
    from draftwire.services.verifier import batcher as batcher_module
    from draftwire.services.verifier import service as verifier

    async def broken_run(self):
        await self.wake.wait()
        raise RuntimeError("planted: the batch loop dies")

    monkeypatch.setattr(batcher_module.Batcher, "run", broken_run)
    async with running(verifier, nats_server.url, "vdies", "--target-model", "tiny-random") as ctx:
        assert not ctx.stopping.is_set()
        from tests.test_loadtest import _request

        with contextlib.suppress(nats.errors.TimeoutError):  # decodes: goes to the (broken) batch loop
            await nc.request(SUBJECTS.verify_instance("vdies"), _request().encode(), timeout=0.5)
        await asyncio.wait_for(ctx.stopping.wait(), 5)
