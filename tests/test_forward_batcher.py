"""Batched drafting: `ForwardBatcher` runs many threads' draft steps as one forward (tiny-random, seconds).

Checked directly: each caller gets exactly the rows its sequence gets alone, requests that wait together share
one pass (and a sequence never appears twice in one), threads that are drafting are waited for so they share
every pass, one caller's bad input fails that caller only, and closing the batcher wakes every waiter with an
error. Then through the draft service in this process: four
concurrent greedy sessions produce the tokens, rounds and acceptances each produces alone, in shared passes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import msgpack
import pytest
import torch
from opentelemetry.trace import NoOpTracer

import draftwire.services.draft.service as draft_service
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import GenerateJob
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.io.bus import SUBJECTS, connect, flush
from draftwire.shared.io.service_shell import ServiceContext
from draftwire.shared.models.forward_batcher import (
    BatchedModel,
    BatchedSequence,
    BatcherClosed,
    ForwardBatcher,
)
from draftwire.shared.models.runtime import load_model
from tests.nats_fixtures import *
from tests.test_draft_target_eos import serve_verifier

PROMPTS = [[5, 9, 2], [7, 1, 8, 3, 3, 4, 11], list(range(20, 32)), list(range(40, 80))]  # 40: a prefill alone


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-random", "fp32", progress=False)


@pytest.fixture
def batcher():
    b = ForwardBatcher("test-batcher")
    yield b
    b.close(5)


def greedy_steps(seq, prompt: list[int], steps: int = 8) -> tuple[list[int], list[torch.Tensor]]:
    """A draft-like walk: one token at a time, a rollback half-way, then a two-row forward."""
    tokens, rows = list(prompt), []
    for i in range(steps):
        if i == steps // 2:
            seq.rollback(len(tokens) - 2)
            tokens = tokens[:-2]
        logits = seq.next_logits(tokens, 1)
        rows.append(logits.clone())
        tokens.append(int(logits[0].argmax()))
    rows.append(seq.next_logits(tokens, 2).clone())
    assert seq.tokens == tokens and len(seq) == len(tokens)
    return tokens, rows


def wait_until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def spawn(fn, *args) -> Future:
    """`fn(*args)` on a daemon thread (a waiter that never wakes fails its test instead of hanging pytest)."""
    future: Future = Future()

    def target():
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed over to the test that waits
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future


def hold(batcher: ForwardBatcher) -> threading.Event:
    """Keep the model thread busy until the returned event is set, so that requests queue up meanwhile."""
    started, gate = threading.Event(), threading.Event()
    spawn(batcher.call, None, lambda: (started.set(), gate.wait(10)))
    assert started.wait(5)
    return gate


def test_each_thread_gets_what_its_sequence_gets_alone(model, batcher):
    alone = [greedy_steps(model.new_sequence(), p) for p in PROMPTS]
    batched = BatchedModel(model, batcher)
    start = threading.Barrier(len(PROMPTS))

    def walk(prompt):
        seq = batched.new_sequence()
        start.wait()
        return greedy_steps(seq, prompt)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(walk, PROMPTS))
    for (tokens, rows), (ref_tokens, ref_rows) in zip(got, alone, strict=True):
        assert tokens == ref_tokens
        for row, ref in zip(rows, ref_rows, strict=True):
            torch.testing.assert_close(row, ref, atol=1e-4, rtol=1e-4)
    assert batcher.rows == len(PROMPTS) * 9 and batcher.passes < batcher.rows  # they shared passes


def test_requests_waiting_together_share_one_pass(model, batcher):
    seqs = [model.new_sequence() for _ in PROMPTS[:3]]
    gate = hold(batcher)
    futures = [spawn(batcher.next_logits, s, p, 1) for s, p in zip(seqs, PROMPTS, strict=False)]
    wait_until(lambda: batcher.waiting == 3)
    gate.set()
    rows = [f.result(timeout=5) for f in futures]
    assert (batcher.passes, batcher.rows) == (1, 3)
    for row, prompt in zip(rows, PROMPTS, strict=False):
        torch.testing.assert_close(row, model.new_sequence().next_logits(prompt, 1), atol=1e-4, rtol=1e-4)


def test_a_sequence_waits_for_the_next_pass_rather_than_appear_twice(model, batcher):
    seq, other = model.new_sequence(), model.new_sequence()
    gate = hold(batcher)
    first = spawn(batcher.next_logits, seq, PROMPTS[0], 1)
    wait_until(lambda: batcher.waiting == 1)
    futures = [first, spawn(batcher.next_logits, seq, [*PROMPTS[0], 4], 1),
               spawn(batcher.next_logits, other, PROMPTS[1], 1)]
    wait_until(lambda: batcher.waiting == 3)
    gate.set()
    for f in futures:
        f.result(timeout=5)
    assert (batcher.passes, batcher.rows) == (2, 3)
    assert seq.tokens == [*PROMPTS[0], 4]


def test_one_callers_bad_input_fails_only_that_caller(model, batcher):
    seqs = [model.new_sequence() for _ in range(3)]
    gate = hold(batcher)
    good = [spawn(batcher.next_logits, seqs[i], PROMPTS[i], 1) for i in (0, 1)]
    bad = spawn(batcher.next_logits, seqs[2], PROMPTS[2], 0)  # n_out 0: refused by the batch
    wait_until(lambda: batcher.waiting == 3)
    gate.set()
    with pytest.raises(ValueError, match="n_out"):
        bad.result(timeout=5)
    for f, prompt in zip(good, PROMPTS, strict=False):
        torch.testing.assert_close(f.result(timeout=5), model.new_sequence().next_logits(prompt, 1),
                                   atol=1e-4, rtol=1e-4)
    assert batcher.passes == 1
    assert batcher.next_logits(seqs[2], PROMPTS[2], 1).shape == (1, model.vocab_size)  # the batcher lives on


def test_close_wakes_every_waiter_with_an_error(model, batcher):
    gate = hold(batcher)
    waiters = [spawn(BatchedSequence(model.new_sequence(), batcher).next_logits, p, 1) for p in PROMPTS[:2]]
    waiters.append(spawn(BatchedSequence(model.new_sequence(), batcher).rollback, 0))
    wait_until(lambda: batcher.waiting == 3)
    batcher.close(timeout=0.05)  # the model thread is still held: close must not wait for it
    gate.set()
    for f in waiters:
        with pytest.raises(BatcherClosed):
            f.result(timeout=2)
    with pytest.raises(BatcherClosed):
        batcher.next_logits(model.new_sequence(), PROMPTS[0], 1)


def test_drafting_threads_are_waited_for_so_they_share_every_pass(model, batcher):
    """Three threads sampling between steps (a sleep here): each pass holds every one still drafting; one that
    stops drafting (fewer steps) holds nobody up."""
    steps = [3, 5, 7]
    ready = threading.Barrier(len(steps))

    def draft(n: int, prompt: list[int]) -> None:
        seq = model.new_sequence()
        with batcher.drafting():
            ready.wait()
            for i in range(n):
                batcher.next_logits(seq, [*prompt, *range(i)], 1)
                # sampling between two steps: the first back must not run alone; after its last step a thread
                # lingers (building its request) while the others wait for it, and leaving must free them
                time.sleep(0.005 if i < n - 1 else 0.05)

    futures = [spawn(draft, n, p) for n, p in zip(steps, PROMPTS, strict=False)]
    for f in futures:
        f.result(timeout=10)
    assert (batcher.passes, batcher.rows) == (max(steps), sum(steps))


# --- through the draft service ------------------------------------------------------------------------------------

SERVICE_PROMPTS = ["hello", "a b c d e f g", "the quick brown fox jumps", "1 2 3"]


async def test_concurrent_sessions_draft_in_shared_passes_with_the_tokens_they_make_alone(
    nats_server, nc, model, monkeypatch
):
    params, spec = SamplingParams(max_new_tokens=20), SpecParams(mode="tkslt", gamma=4, k=8, policy="fixed")
    engine = LocalEngine(model, model)
    alone = [await engine.agenerate(p, params, spec, open_early=True) for p in SERVICE_PROMPTS]  # as the service
    made: list[ForwardBatcher] = []
    outside: list[str] = []  # threads that asked for a step outside `drafting()`: the model would not wait for them

    class Recording(ForwardBatcher):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

        def next_logits(self, seq, tokens, n_out=1):
            if threading.get_ident() not in self._drafting:
                outside.append(threading.current_thread().name)
            return super().next_logits(seq, tokens, n_out)

    monkeypatch.setattr(draft_service, "ForwardBatcher", Recording)
    verifier = await serve_verifier(nats_server.url, model, list(model.eos_token_ids))
    args = draft_service.build_parser().parse_args(["--draft-model", "tiny-random", "--draft-dtype", "fp32"])
    ctx = ServiceContext(name="draft", instance="d1", args=args, nc=await connect(nats_server.url, name="draft"),
                         tracer=NoOpTracer())
    try:
        await draft_service.start(ctx)
        await flush(ctx.nc)
        subs, jobs = [], []
        for prompt in SERVICE_PROMPTS:
            session = uuid.uuid4().hex
            subs.append(await nc.subscribe(SUBJECTS.done(session)))
            jobs.append(GenerateJob(f"r{session[:8]}", prompt, params, spec, format="msgpack", session=session,
                                    deadline=time.time() + 60))
        replies = await asyncio.gather(*(nc.request(SUBJECTS.draft_start, j.encode(), timeout=10) for j in jobs))
        assert all(msgpack.unpackb(r.data)["accepted"] for r in replies)
        bodies = [msgpack.unpackb((await s.next_msg(timeout=60)).data) for s in subs]
        for body, ref in zip(bodies, alone, strict=True):
            assert "error" not in body, body
            assert body["token_ids"] == ref.token_ids
            ref_stats = ref.stats.summary()
            assert [body["stats"][k] for k in ("rounds", "drafted", "accepted")] == [
                ref_stats[k] for k in ("rounds", "drafted", "accepted")]
        (batcher,) = made
        assert batcher.passes < batcher.rows  # the sessions' draft steps shared forwards
        assert not outside
    finally:
        for cleanup in reversed(ctx.cleanups):
            await cleanup()
        for svc in ctx.services:
            await svc.stop()
        await ctx.nc.close()
        await verifier.close()
        await asyncio.sleep(0)
