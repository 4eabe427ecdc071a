"""Draining a verifier (and a draft) for maintenance, on a real nats-server with the services in this process.

Two verifiers, one draft and a scheduler, tiny models (tiny-random fp32 target, its int8 copy drafting, so
rounds reject now and then). Several greedy prompts run; the verifier serving the first round is drained
through `draftwire drain`'s own coroutine mid-run: every prompt completes with the tokens of a fault-free
run, handed over (grace 0: the sessions move at their next round and re-prefill on the other verifier) or
finished where they are (no grace limit: none moves), and afterwards no round at all reaches the drained one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal

import msgpack
import pytest

from draftwire.services.cli.drain import ALL_BUT_ONE, choose, drain
from draftwire.services.draft import service as draft_service
from draftwire.services.verifier import service as verifier_service
from draftwire.shared.core.drain import (
    DrainCommand,
    DrainState,
    DrainStatus,
    draft_drain_subject,
    parse_command,
    verifier_drain_subject,
)
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.placement import draft_load, least_loaded, verifier_load
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.io.bus import DRAFT_PREFIX, SUBJECTS
from draftwire.shared.io.loads import Reported, gather_stats
from draftwire.shared.models.runtime import load_model
from tests.in_process import running as in_process
from tests.in_process import scheduler
from tests.nats_fixtures import *

N_PROMPTS = 6
TOKENS = 96  # per prompt (end-of-sequence masked): ~24 rounds, so a drain lands mid-run
VERIFIERS = ("ver-a", "ver-b")


@contextlib.asynccontextmanager
async def tiny_stack(url: str, term_drain_s: float = 0.0):
    """Two verifiers (the first drains on SIGTERM for up to `term_drain_s`; 0: the test process's SIGTERM is
    left alone), a draft and a scheduler; yields the verifiers' contexts."""
    verifier = ("--target-model", "tiny-random", "--target-dtype", "fp32")
    async with (in_process(verifier_service, url, VERIFIERS[0], *verifier, "--drain-on-term", str(term_drain_s)) as a,
                in_process(verifier_service, url, VERIFIERS[1], *verifier, "--drain-on-term", "0") as b,
                in_process(draft_service, url, "draft-1", "--draft-model", "tiny-random", "--draft-dtype", "int8"),
                scheduler(url, "--default-mode", "tkslt", "--default-gamma", "4")):
        yield {VERIFIERS[0]: a, VERIFIERS[1]: b}


def text(i: int) -> str:
    return f"prompt {i}: def f(x):"


def prompt(i: int, tag: str) -> dict:
    return {"id": f"{tag}-{i}", "prompt": text(i), "max_new_tokens": TOKENS, "min_new_tokens": TOKENS,
            "temperature": 0}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The services here share this process and two cores: one intra-op thread each, as `draftwire up` gives
    them (torch's default spins every core's thread and runs many times slower on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(one_torch_thread) -> list[list[int]]:
    """The prompts' greedy tokens from a fault-free run (the in-process engine, the same model pair)."""
    engine = LocalEngine(load_model("tiny-random", "fp32", progress=False),
                         load_model("tiny-random", "int8", progress=False))
    params = SamplingParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    return [engine.generate(text(i), params, SpecParams()).token_ids for i in range(N_PROMPTS)]


async def ask(nc, body: dict) -> dict:
    msg = await nc.request(SUBJECTS.prompts, json.dumps(body).encode(), timeout=60)
    return json.loads(msg.data)


async def run_prompts(nc, tag: str, n: int = N_PROMPTS) -> list[dict]:
    return await asyncio.gather(*(ask(nc, prompt(i, tag)) for i in range(n)))


def drain_args(url: str, instance: str, grace: float, resume: bool = False) -> argparse.Namespace:
    """`draftwire drain verifier INSTANCE --grace GRACE [--resume]`'s arguments."""
    return argparse.Namespace(service="verifier", instance=instance, grace=grace, timeout=20.0, resume=resume,
                              nats=url, creds=None, tls_ca=None, tls_cert=None, tls_key=None)


async def verify_requests(nc, instance: str) -> int:
    """How many verify rounds `instance` has received (its micro endpoints' request counts)."""
    stats = await gather_stats(nc, "draftwire-verifier", window=1.0, quiet=0.1, expect=VERIFIERS)
    raw = await nc.request(f"$SRV.STATS.draftwire-verifier.{stats[instance].service_id}", b"", timeout=2)
    endpoints = json.loads(raw.data)["endpoints"]
    return sum(e["num_requests"] for e in endpoints if e["subject"].startswith("draftwire.verify"))


async def drain_mid_run(nc, url: str, grace: float, capsys) -> tuple[list[dict], str, int]:
    """Run the prompts, drain the verifier of the first round once it is served: (results, drained, CLI rc)."""
    first: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_round(msg) -> None:
        event = msgpack.unpackb(msg.data)
        if event["request_id"].startswith("drain-") and not first.done():
            first.set_result(event["verifier_instance"])

    sub = await nc.subscribe(SUBJECTS.events_round, cb=on_round)
    running = asyncio.ensure_future(run_prompts(nc, "drain"))
    try:
        victim = await asyncio.wait_for(first, 30)
        rc = await drain(drain_args(url, victim, grace))
        results = await running
    finally:
        await sub.unsubscribe()
    out = capsys.readouterr().out
    assert f"verifier {victim}: drained" in out, out
    return results, victim, rc


async def test_a_verifier_drained_mid_run_hands_its_sessions_over_and_takes_no_new_one(
    nats_server, nc, capsys, reference
):
    async with tiny_stack(nats_server.url):
        results, victim, rc = await drain_mid_run(nc, nats_server.url, 0.0, capsys)
        assert rc == 0
        for ref, got in zip(reference, results, strict=True):
            assert "error" not in got, got
            assert got["token_ids"] == ref
        moved = [r for r in results if r["stats"]["verifier_instances"][:1] == [victim]
                 and len(r["stats"]["verifier_instances"]) == 2]
        assert moved, [r["stats"]["verifier_instances"] for r in results]  # the drain caught sessions mid-run

        (reported,) = [r for r in (await gather_stats(nc, "draftwire-verifier", window=1.0, quiet=0.1,
                                                     expect=VERIFIERS)).values() if r.instance == victim]
        assert reported.data["draining"] is True and reported.data["sessions"] == 0
        before = await verify_requests(nc, victim)
        after_drain = await run_prompts(nc, "after", 3)
        assert all("error" not in r and victim not in r["stats"]["verifier_instances"] for r in after_drain)
        assert await verify_requests(nc, victim) == before  # not a single round reached it


async def test_a_verifier_drained_without_grace_limit_finishes_its_sessions_there(
    nats_server, nc, capsys, reference
):
    async with tiny_stack(nats_server.url):
        results, victim, rc = await drain_mid_run(nc, nats_server.url, float("inf"), capsys)
        assert rc == 0
        assert [r.get("token_ids") for r in results] == reference
        served = [r["stats"]["verifier_instances"] for r in results]
        assert all(len(s) == 1 for s in served), served  # nobody moved: each finished where it was
        assert [victim] in served, served
        before = await verify_requests(nc, victim)
        after_drain = await run_prompts(nc, "after", 3)
        assert all("error" not in r and r["stats"]["verifier_instances"] != [victim] for r in after_drain)
        assert await verify_requests(nc, victim) == before


async def test_a_resumed_verifier_takes_sessions_again_and_all_but_one_keeps_one(nats_server, nc, capsys):
    async with tiny_stack(nats_server.url):
        assert await drain(drain_args(nats_server.url, ALL_BUT_ONE, 0.0)) == 0
        out = capsys.readouterr().out
        kept = out.split("keeping verifier ", 1)[1].split()[0]
        (drained,) = set(VERIFIERS) - {kept}
        assert f"verifier {drained}: drained" in out, out
        results = await run_prompts(nc, "one", 3)
        assert all(r["stats"]["verifier_instances"] == [kept] for r in results)
        assert await drain(drain_args(nats_server.url, drained, 0.0, resume=True)) == 0
        bad = await nc.request(verifier_drain_subject(drained), b'{"action": "drian"}', timeout=2)
        assert json.loads(bad.data)["error"]["code"] == "bad_request"  # and it neither drains nor resumes
        status = await nc.request(verifier_drain_subject(drained), b'{"action": "status"}', timeout=2)
        assert not DrainStatus.decode(status.data).draining
        await nc.request(verifier_drain_subject(kept), b'{"action": "drain", "grace_s": 0}', timeout=2)
        results = await run_prompts(nc, "resumed", 2)
        assert all(r["stats"]["verifier_instances"] == [drained] for r in results), results


async def test_a_draft_drained_mid_run_finishes_its_generations_and_takes_no_new_job(nats_server, nc, reference):
    drafting: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_round(msg) -> None:
        if msgpack.unpackb(msg.data)["draft_instance"] == "draft-1" and not drafting.done():
            drafting.set_result(None)

    subject = draft_drain_subject("draft-1", DRAFT_PREFIX)
    async with tiny_stack(nats_server.url), in_process(draft_service, nats_server.url, "draft-2", "--draft-model",
                                                    "tiny-random", "--draft-dtype", "int8"):
        sub = await nc.subscribe(SUBJECTS.events_round, cb=on_round)
        running = asyncio.ensure_future(run_prompts(nc, "d", 4))
        await asyncio.wait_for(drafting, 30)
        bad = await nc.request(subject, b'{"grace_s": -1}', timeout=2)
        assert json.loads(bad.data)["error"]["code"] == "bad_request"
        assert not DrainStatus.decode((await nc.request(subject, b'{"action": "status"}', timeout=2)).data).draining
        status = DrainStatus.decode((await nc.request(subject, b"", timeout=2)).data)
        await sub.unsubscribe()
        assert status.draining and status.sessions >= 1  # mid-run
        results = await running
        assert [r.get("token_ids") for r in results] == reference[:4]
        assert sum(r["stats"]["draft_instance"] == "draft-1" for r in results) >= status.sessions
        assert all(r["stats"].get("resumed_tokens", 0) == 0 for r in results)  # none re-dispatched elsewhere
        after = await run_prompts(nc, "d-after", 4)
        assert {r["stats"]["draft_instance"] for r in after} == {"draft-2"}
        assert DrainStatus.decode((await nc.request(subject, b'{"action": "status"}', timeout=2)).data).drained


async def test_sigterm_hands_a_verifier_s_sessions_over_then_stops_it(nats_server, nc, reference):
    serving: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_round(msg) -> None:
        if msgpack.unpackb(msg.data)["verifier_instance"] == VERIFIERS[0] and not serving.done():
            serving.set_result(None)

    async with tiny_stack(nats_server.url, term_drain_s=5.0) as verifiers:
        # the first verifier replaced this process's SIGTERM handler: the signal reaches it, not pytest
        assert signal.SIGTERM in asyncio.get_running_loop()._signal_handlers
        sub = await nc.subscribe(SUBJECTS.events_round, cb=on_round)
        running = asyncio.ensure_future(run_prompts(nc, "term"))
        await asyncio.wait_for(serving, 30)
        os.kill(os.getpid(), signal.SIGTERM)
        ctx = verifiers[VERIFIERS[0]]
        await asyncio.wait_for(ctx.stopping.wait(), 5)
        stats = await gather_stats(nc, "draftwire-verifier", window=1.0, quiet=0.1, expect=VERIFIERS)
        assert stats[VERIFIERS[0]].data["draining"] and stats[VERIFIERS[0]].data["sessions"] == 0  # it let go first
        for svc in ctx.services:  # and stops, as the service shell does once `stopping` is set
            await svc.stop()
        results = await running
        await sub.unsubscribe()
        assert [r.get("token_ids") for r in results] == reference
        served = [r["stats"]["verifier_instances"] for r in results]
        assert list(VERIFIERS) in served, served  # sessions it held moved to the other one


def test_drain_state_serves_held_sessions_in_the_grace_then_hands_them_over():
    state = DrainState()
    assert state.admits(held=False, now=0.0)
    state.begin(10.0, grace_s=5.0)
    assert state.admits(held=True, now=14.9) and not state.admits(held=False, now=11.0)
    assert not state.admits(held=True, now=15.0) and state.handing_over(15.0)
    state.begin(12.0, grace_s=1.0)  # a second drain keeps the start and may shorten the grace
    assert state.since == 10.0 and state.handing_over(11.0)
    state.resume()
    assert state.admits(held=False, now=20.0)


def test_drain_requests_are_checked():
    assert parse_command(b"") == DrainCommand()
    assert parse_command(b'{"action": "status"}').action == "status"
    assert parse_command(b'{"grace_s": null}').grace_s == float("inf")
    for bad in (b"[1]", b'{"action": "stop"}', b'{"grace_s": -1}', b'{"grace_s": true}', b'{"x": 1}', b"\xff"):
        with pytest.raises(ValueError):
            parse_command(bad)


def test_placement_never_chooses_a_draining_instance_and_all_but_one_keeps_the_busiest():
    rng = __import__("random").Random(0)
    loads = [verifier_load("a", {"sessions": 0, "queue": 0, "draining": True}),
             verifier_load("b", {"sessions": 9, "queue": 9, "max_queue": 9})]
    assert least_loaded(loads, rng).instance == "b"  # full, but not draining
    assert least_loaded([draft_load("d", {"active": 0, "max": 4, "draining": True})], rng) is None
    reported = {name: Reported(name, "id", data) for name, data in
                (("v1", {"sessions": 1}), ("v2", {"sessions": 5}), ("v3", {"sessions": 7, "draining": True}))}
    assert choose(reported, ALL_BUT_ONE) == (["v1", "v3"], "v2")
    with pytest.raises(ValueError, match="running: v1, v2, v3"):
        choose(reported, "v9")
    assert verifier_drain_subject("v1") == "draftwire.verifier.drain.v1"
