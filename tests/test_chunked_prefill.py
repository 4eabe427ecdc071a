"""Chunked prefill: a long prompt's prefill runs a chunk per forward pass, on the edge and on the device.

On the edge (`VerifierCore(prefill_chunk=...)`), the verdicts are those of one-pass prefills; through the
verifier's `Batcher`, other sessions' rounds are answered between two chunks of a long prefill, and a
session closed mid-prefill stops before its next chunk. On the device, `DraftSession.warm_up` builds the
one-pass cache chunk by chunk and stops between two chunks once asked to.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from draftwire.services.verifier.batcher import Batcher
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.protocol import ErrorReply, Verdict, decode_any
from draftwire.shared.core.speculation import InProcessEdge, new_session, speculate
from draftwire.shared.core.verifier_sessions import PrefillPending, VerifierCore
from tests.tiny_pair_fixtures import *

LONG = [1 + (13 * i) % 250 for i in range(120)]  # prompt token ids: many chunks of 8
SHORT = [5, 6, 7]
SPEC = SpecParams(mode="tkslt", gamma=3, k=8)


def _session(target, draft, prompt, sid, seed=0, max_new=12):
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=seed)
    return new_session(draft, target.tokenizer, target.eos_token_ids, target.vocab_size, prompt, params, SPEC,
                       session_id=sid)


@pytest.mark.parametrize("chunk", [7, 16, 119])
def test_chunked_prefill_gives_the_verdicts_of_a_one_pass_prefill(target, draft, chunk):
    """Sampled generations: every verdict (so every token) equals the unchunked verifier's."""
    def run(core):
        outputs = []
        for seed in range(3):
            session = _session(target, draft, LONG, f"s{seed}", seed)
            outputs.append(asyncio.run(speculate(session, InProcessEdge(core), decode=target.decode)).token_ids)
        return outputs

    assert run(VerifierCore(target, prefill_chunk=chunk)) == run(VerifierCore(target))


def test_each_pass_feeds_one_chunk_then_the_round_gets_its_verdict(target, draft):
    core = VerifierCore(target, prefill_chunk=32)
    req, _ = _session(target, draft, LONG, "s").next_request(3)
    seen = []
    while isinstance(result := core.handle_batch([req])[0], PrefillPending):
        seen.append(result.cached)
    assert seen == [32, 64, 96] and result.session == "s"  # 120 history tokens: the last 24 with the draft's
    assert isinstance(result, Verdict) and core.forwards == 4
    one_pass = VerifierCore(target).handle(req)
    assert (result.n_accepted, result.token) == (one_pass.n_accepted, one_pass.token)


def test_a_chunked_cache_holds_the_one_pass_cache(target):
    """The rows after a prefill built in chunks are the one-pass rows, up to float rounding."""
    whole, chunked = target.new_sequence(), target.new_sequence()
    ref = whole.next_logits(LONG + SHORT, 4)
    for end in range(8, len(LONG), 8):
        chunked.next_logits(LONG[:end], 1)
    got = chunked.next_logits(LONG + SHORT, 4)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@contextlib.asynccontextmanager
async def _batcher(target):
    """The verifier service's Batcher running on a core that prefills 8 tokens per pass."""
    core = VerifierCore(target, prefill_chunk=8)
    with ThreadPoolExecutor(1) as worker:
        batcher = Batcher(core, worker, budget=64, max_queue=16)
        runner = asyncio.create_task(batcher.run())
        try:
            yield core, batcher, worker
        finally:
            runner.cancel()


async def test_other_sessions_are_answered_between_two_chunks_of_a_long_prefill(target, draft):
    async with _batcher(target) as (core, batcher, _):
        long = asyncio.ensure_future(batcher.submit(_session(target, draft, LONG, "long").next_request(3)[0]))
        await asyncio.sleep(0)
        short = await batcher.submit(_session(target, draft, SHORT, "short").next_request(3)[0])
        assert isinstance(decode_any(short), Verdict) and not long.done()  # the prefill has more chunks to go
        assert isinstance(decode_any(await long), Verdict)
        assert core.forwards >= len(LONG) // 8


async def test_a_close_stops_a_prefill_before_its_next_chunk(target, draft):
    async with _batcher(target) as (core, batcher, worker):
        reply = asyncio.ensure_future(batcher.submit(_session(target, draft, LONG, "long").next_request(3)[0]))
        for _ in range(5000):
            if core.forwards >= 3 or reply.done():
                break
            await asyncio.sleep(0.001)
        batcher.closed("long")  # the verifier service's order: the batcher first, then the core
        await asyncio.get_running_loop().run_in_executor(worker, core.close, "long")
        refused = decode_any(await reply)
        assert isinstance(refused, ErrorReply) and refused.code == "unknown_session", refused
        passes = core.forwards
        await asyncio.sleep(0.2)
        assert core.forwards == passes < len(LONG) // 8 and "long" not in core and not batcher.waiting


def test_the_drafts_warm_up_builds_its_cache_in_chunks_and_stops_between_two(target, draft):
    session = _session(target, draft, LONG, "s")
    asked = []

    def stop_after_two() -> bool:
        asked.append(1)
        return len(asked) >= 2

    assert session.warm_up(stop_after_two, chunk=16) is False
    assert len(session._seq) == 32 and len(asked) == 2  # not asked before the first chunk
    assert session.warm_up(chunk=16) is True and session._seq.tokens == LONG
    whole = draft.new_sequence()
    torch.testing.assert_close(session._seq.next_logits(LONG + SHORT, 3), whole.next_logits(LONG + SHORT, 3),
                               rtol=1e-4, atol=1e-4)


def test_a_cancel_during_the_drafts_prefill_ends_the_generation_before_any_round(target, draft):
    session = _session(target, draft, LONG * 6, "s")  # 720 tokens: two chunks of the default size
    rounds = []

    async def edge_exchange(uplink, req):
        rounds.append(req.round)
        return await InProcessEdge(VerifierCore(target)).exchange(uplink, req)

    edge = InProcessEdge(VerifierCore(target))
    edge.exchange = edge_exchange
    result = asyncio.run(speculate(session, edge, decode=target.decode, should_stop=lambda: "cancelled"))
    assert result.finish_reason == "cancelled" and not rounds and not result.token_ids
    assert 0 < len(session._seq) < len(LONG * 6)  # the first chunk ran, the second did not


async def test_a_cancelled_generation_leaves_no_round_in_flight(target, draft):
    """Cancelling the generation (the draft service's cancel or deadline) cancels the round it sent too: a
    round left running alone would resend its history when the edge drops the closed session, and the edge
    would prefill it again for nobody."""
    sent, ended = asyncio.Event(), []

    class SlowEdge:
        async def exchange(self, uplink, req):
            sent.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise
            ended.append("answered")

    async def compute(fn):
        return await asyncio.to_thread(fn)

    session = _session(target, draft, LONG, "s")
    task = asyncio.create_task(speculate(session, SlowEdge(), decode=target.decode, compute=compute,
                                         open_early=True))
    await asyncio.wait_for(sent.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.01)
    assert ended == ["cancelled"]


async def test_a_bad_prefill_chunk_is_refused_with_a_clear_error_before_any_model_loads(monkeypatch):
    from opentelemetry.trace import NoOpTracer

    from draftwire.services.verifier import service
    from draftwire.shared.io.service_shell import ServiceContext

    parser = service.build_parser()
    assert parser.parse_args([]).prefill_chunk == 512
    monkeypatch.setenv("DRAFTWIRE_PREFILL_CHUNK", "0")
    assert service.build_parser().parse_args([]).prefill_chunk == 0  # 0: whole prefills
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefill-chunk", "many"])
    ctx = ServiceContext(name="verifier", instance="v", args=parser.parse_args(["--prefill-chunk", "-1"]), nc=None,
                         tracer=NoOpTracer())
    with pytest.raises(SystemExit, match="--prefill-chunk >= 0"):
        await service.start(ctx)  # before the model loads or the connection is used (there is none)
    with pytest.raises(ValueError, match="prefill_chunk"):
        VerifierCore(object(), prefill_chunk=0)
