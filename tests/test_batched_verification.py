"""Batched verification across sessions: one forward pass, each row exactly its own session.

The known failure of batched speculative decoding is a row that silently reads another row's positions, mask
or KV. So the batched forward is checked row by row against each sequence's uncached forward (rows with
different past lengths, different numbers of new tokens, rollbacks in between), and the check is shown to
catch a planted desync: shorter rows' position ids shifted to the longest row's, rows' new KV written back one
column off, a causal mask aligned to the start instead of the end. Then the sessions'
verdicts from `handle_batch` equal those of one session at a time, a budget verifies prefixes (TETRIS) and
stays lossless, and 16 concurrent sampled sessions through the real `Batcher` have the target's distribution
(chi-square, with a planted desync as the negative control).
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from draftwire.services.verifier.batcher import Batcher
from draftwire.shared.core.draft_selection import expected_accepted, select_prefixes
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.protocol import ErrorReply, Verdict, decode_any
from draftwire.shared.core.speculation import RemoteError, decode_round, new_session, speculate, verify_bytes
from draftwire.shared.core.verifier_sessions import VerifierCore
from draftwire.shared.models import batched_forward
from draftwire.shared.models.batched_forward import next_logits_batch
from tests.exact_distribution import by_rank, conditional_pvalue
from tests.tiny_pair_fixtures import *

PASS_P = 1e-3
REJECT_P = 1e-6


def _max_row_error(model, steps: int = 6, rows: int = 5, seed: int = 0) -> float:
    """Largest |batched - uncached| logit over `steps` batches of `rows` sequences that grow, verify a few
    tokens and roll back by random amounts, as verification rounds do. The reference is one forward over the
    whole sequence without any cache (a sequence alone runs the batched code as a batch of one, so it could
    share a bug)."""
    rng = random.Random(seed)
    batched = [model.new_sequence() for _ in range(rows)]
    history = [[rng.randrange(model.vocab_size) for _ in range(rng.randrange(3, 20))] for _ in range(rows)]
    worst = 0.0
    for step in range(steps):
        tokens, n_outs = [], []
        for b in range(rows):
            if step:
                history[b] = history[b][: len(history[b]) - rng.randrange(0, 3)]
            n = rng.randrange(1, 6)
            tokens.append(history[b] + [rng.randrange(model.vocab_size) for _ in range(n)])
            n_outs.append(n)
        with torch.inference_mode():
            expected = [model.model(torch.tensor([t]), use_cache=False).logits[0, -n:].float()
                        for t, n in zip(tokens, n_outs, strict=True)]
        got = next_logits_batch(batched, tokens, n_outs)
        for e, g in zip(expected, got, strict=True):
            assert e.shape == g.shape
            worst = max(worst, float((e - g).abs().max()))
        history = tokens
    return worst


def test_each_batched_row_is_its_sequence_alone(target):
    assert _max_row_error(target) < 1e-4


def test_a_shifted_row_of_position_ids_is_caught(target, monkeypatch):
    right = batched_forward.position_ids

    def shifted(past, width):  # the classic bug: every row numbered from the batch's longest past
        return right([max(past)] * len(past), width)

    monkeypatch.setattr(batched_forward, "position_ids", shifted)
    assert _max_row_error(target) > 1e-2


def test_kv_written_back_one_column_off_is_caught(target, monkeypatch):
    right = batched_forward.row_states

    def off_by_one(keys, values, offset, width):  # a planted desync: every row after the first keeps the
        return right(keys, values, max(offset - 1, 0), width)  # column before its new tokens (the previous row's)

    monkeypatch.setattr(batched_forward, "row_states", off_by_one)
    assert _max_row_error(target) > 1e-2


def test_a_row_mask_aligned_to_the_start_is_caught(target, monkeypatch):
    def top_left(past, width, device="cpu"):  # the classic SDPA is_causal mistake: causal from column 0
        return None if width == 1 else (torch.arange(past + width)[None, :] <= torch.arange(width)[:, None])[None, None]

    monkeypatch.setattr(batched_forward, "row_mask", top_left)
    assert _max_row_error(target) > 1e-2


def test_prefill_rows_run_alone_and_the_rest_batch(target, monkeypatch):
    calls = []
    right = batched_forward._forward_rows
    monkeypatch.setattr(batched_forward, "_forward_rows", lambda s, t, n: calls.append(len(s)) or right(s, t, n))
    seqs = [target.new_sequence() for _ in range(3)]
    long = list(range(batched_forward.PREFILL_ROWS + 5))
    next_logits_batch(seqs, [long, [1, 2, 3], [4, 5]], [1, 1, 2])
    assert calls == [2, 1]  # the two short rows, then the prefill (a batch of one)
    calls.clear()  # prefills of similar lengths share a pass, and each row is still itself alone
    prompts = [list(range(3, 43)), list(range(5, 55)), list(range(9, 109)), [7, 8]]
    got = next_logits_batch([target.new_sequence() for _ in prompts], prompts, [1, 3, 1, 2])
    assert calls == [1, 2, 1]  # the short row; 40 and 50 new tokens share a pass; 100 runs alone
    for p, n, g in zip(prompts, [1, 3, 1, 2], got, strict=True):
        assert float((target.new_sequence().next_logits(p, n) - g).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="twice"):
        next_logits_batch([seqs[0], seqs[0]], [[1, 2], [1, 2]], [1, 1])


def test_a_pass_that_fails_midway_leaves_every_cache_as_it_was(target, monkeypatch):
    """Rows write their keys/values layer by layer inside the pass; a failure in a later layer must not leave
    the earlier layers' new columns behind (the draft's batcher retries a failed batch row by row)."""
    seqs = [target.new_sequence() for _ in range(3)]
    history = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    next_logits_batch(seqs, history, [1, 1, 1])
    layer = target.model.model.layers[-1]

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(layer, "forward", broken)
    with pytest.raises(RuntimeError, match="planted"):
        next_logits_batch(seqs, [h + [1, 2] for h in history], [2, 2, 2])
    monkeypatch.undo()
    for seq, h in zip(seqs, history, strict=True):
        assert seq.tokens == h and all(lay.get_seq_length() == len(h) for lay in seq._cache.layers)
    got = next_logits_batch(seqs, [h + [3] for h in history], [1, 1, 1])
    with torch.inference_mode():
        for h, g in zip(history, got, strict=True):
            expected = target.model(torch.tensor([h + [3]]), use_cache=False).logits[0, -1:].float()
            assert float((expected - g).abs().max()) < 1e-4


def _sessions(target, draft, n: int, temperature: float, gamma: int = 3, max_new: int = 12):
    spec = SpecParams(mode="tkslt", gamma=gamma, k=8)
    prompts = [[1 + (7 * i + j) % 200 for j in range(3 + i % 5)] for i in range(n)]  # lengths 3..7
    return [
        new_session(draft, target.tokenizer, target.eos_token_ids, target.vocab_size, prompts[i],
                    SamplingParams(temperature=temperature, max_new_tokens=max_new, seed=i), spec,
                    session_id=f"s{i:02d}")
        for i in range(n)
    ]


def _rounds_lockstep(target, sessions, budget=None, core=None):
    """Drive sessions round by round, all rounds of a step in one handle_batch call; returns the verdicts."""
    core = core or VerifierCore(target, max_sessions=64)
    verdicts = []
    live = list(sessions)
    while live:
        reqs = [s.next_request()[0] for s in live]
        for s, req, result in zip(live, reqs, core.handle_batch(reqs, budget), strict=True):
            assert isinstance(result, Verdict), result
            s.apply(req, result)
            verdicts.append(result)
        live = [s for s in live if not s.done]
    return verdicts, [s.generated for s in sessions]


def test_a_batch_gives_each_session_the_verdicts_it_gets_alone(target, draft):
    verdicts, together = _rounds_lockstep(target, _sessions(target, draft, 8, temperature=0.8))
    # the load each verdict reports; the cost per token is learnt from passes without a prefill (not the first)
    assert verdicts[0].batch == 8 and verdicts[0].token_s == 0 < verdicts[8].token_s
    alone = [_rounds_lockstep(target, [s])[1][0] for s in _sessions(target, draft, 8, temperature=0.8)]
    assert together == alone


def test_a_refused_round_does_not_disturb_the_others(target, draft):
    core = VerifierCore(target, max_sessions=8)
    a, b = _sessions(target, draft, 2, temperature=0.0)
    good = a.next_request()[0]
    unknown = b.next_request()[0]
    unknown = type(unknown)(**{**unknown.__dict__, "history": None, "params": None, "prompt_len": None})
    results = core.handle_batch([good, unknown])
    assert isinstance(results[0], Verdict) and results[0].batch == 1
    assert getattr(results[1], "code", None) == "unknown_session"


def test_budgeted_selection_maximises_expected_accepted_tokens():
    rows = [[0.9, 0.9, 0.9], [0.2, 0.9, 0.9], [1.0, 1.0, 1.0]]
    chosen = select_prefixes(rows, budget=3 + 4)
    best = max(
        (k for k in np.ndindex(4, 4, 4) if sum(k) <= 4),
        key=lambda k: sum(expected_accepted(r, n) for r, n in zip(rows, k, strict=True)),
    )
    assert sum(expected_accepted(r, n) for r, n in zip(rows, chosen, strict=True)) == pytest.approx(
        sum(expected_accepted(r, n) for r, n in zip(rows, best, strict=True)))
    assert select_prefixes([[1.0] * 4] * 3, budget=3 + 6) == [2, 2, 2]  # greedy drafts tie: shared fairly
    with pytest.raises(ValueError):
        select_prefixes([[1.0]] * 3, budget=2)


def test_a_budget_verifies_prefixes_and_says_so(target, draft):
    verdicts, outputs = _rounds_lockstep(target, _sessions(target, draft, 6, temperature=0.0), budget=6 + 6)
    assert any(v.considered is not None for v in verdicts)
    assert all(v.n_accepted <= (v.considered if v.considered is not None else 3) for v in verdicts)
    _, unbudgeted = _rounds_lockstep(target, _sessions(target, draft, 6, temperature=0.0))
    assert outputs == unbudgeted  # greedy: verifying fewer draft tokens changes speed, never tokens


class _BatcherEdge:
    """The device side of the real verifier `Batcher`, in process."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    async def exchange(self, uplink: bytes, req) -> bytes:
        decoded = decode_round(uplink)
        return decoded if isinstance(decoded, bytes) else await self.batcher.submit(decoded)


async def _concurrent_outputs(target, draft, budget: int, samples: int, concurrency: int = 16, sampling="numpy"):
    """`samples` sampled generations of one prompt by `concurrency - 4` devices at once, while 4 more devices
    run sessions with a long prompt beside them, so every batch mixes rows of very different lengths."""
    prompt = target.encode("def f(x):")
    long_prompt = target.encode("a much longer prompt, so that the rows of every batch differ in length " * 3)
    params = [SamplingParams(temperature=0.8, max_new_tokens=8, seed=seed) for seed in range(samples)]
    spec = SpecParams(mode="tkslt", gamma=3, k=8)
    core = VerifierCore(target, max_sessions=64, sampling=sampling)
    with ThreadPoolExecutor(1) as worker:
        batcher = Batcher(core, worker, budget=budget, max_queue=256)
        runner = asyncio.create_task(batcher.run())
        queue = list(range(samples))
        outputs: list[list[int]] = [[] for _ in range(samples)]

        async def run(i: int, text: list[int], sp: SamplingParams) -> list[int]:
            session = new_session(draft, target.tokenizer, target.eos_token_ids, target.vocab_size, text, sp, spec,
                                  session_id=f"c{i:05d}")
            result = await speculate(session, _BatcherEdge(batcher), decode=target.decode)
            core.close(session.session)
            return result.token_ids

        async def device() -> None:
            while queue:
                i = queue.pop()
                outputs[i] = await run(i, prompt, params[i])

        async def neighbour(j: int) -> None:
            n = 0
            while queue:
                n += 1
                await run(10_000 + 100 * j + n % 100, long_prompt, SamplingParams(max_new_tokens=24, seed=n))

        await asyncio.gather(*(device() for _ in range(concurrency - 4)), *(neighbour(j) for j in range(4)))
        runner.cancel()
    return prompt, params[0], outputs, core


SAMPLES = 300


@pytest.mark.parametrize(("budget", "sampling"), [pytest.param(128, "numpy", marks=pytest.mark.slow), (24, "torch")])
def test_sixteen_concurrent_sampled_sessions_have_the_target_distribution(target, draft, budget, sampling):
    prompt, params, outputs, core = asyncio.run(_concurrent_outputs(target, draft, budget, SAMPLES, sampling=sampling))
    assert core.batch_rows / core.forwards > 8, "the sessions did not share forward passes"
    p = conditional_pvalue(target, prompt, params, outputs, by_rank(4))
    print(f"budget {budget}: {core.forwards} forwards, {core.batch_rows / core.forwards:.1f} rows each, p = {p:.3g}")
    assert p > PASS_P


@pytest.mark.slow  # 30 s; test_a_shifted_row_of_position_ids_is_caught plants the same bug in the default suite
def test_a_planted_row_desync_fails_the_distribution_test(target, draft, monkeypatch):
    right = batched_forward.position_ids
    # the classic bug: every row numbered from the batch's longest past (one session's positions shifted)
    monkeypatch.setattr(batched_forward, "position_ids", lambda past, width: right([max(past)] * len(past), width))
    prompt, params, outputs, _ = asyncio.run(_concurrent_outputs(target, draft, 128, 2 * SAMPLES))
    p = conditional_pvalue(target, prompt, params, outputs, by_rank(4))
    print(f"planted desync: p = {p:.3g}")
    assert p < REJECT_P


async def test_a_full_queue_answers_busy_with_a_retry_hint(target, draft):
    core = VerifierCore(target, max_sessions=8)
    with ThreadPoolExecutor(1) as worker:
        batcher = Batcher(core, worker, budget=64, max_queue=2)  # not running: nothing drains the queue
        sessions = _sessions(target, draft, 3, temperature=0.0)
        waiting = [asyncio.ensure_future(batcher.submit(s.next_request()[0])) for s in sessions[:2]]
        await asyncio.sleep(0)
        reply = decode_any(await batcher.submit(sessions[2].next_request()[0]))
        assert isinstance(reply, ErrorReply) and reply.code == "busy" and reply.retry_s > 0
        assert batcher.busy == 1
        runner = asyncio.create_task(batcher.run())
        assert all(isinstance(decode_any(r), Verdict) for r in await asyncio.gather(*waiting))
        runner.cancel()


def test_verdict_and_error_load_fields_survive_the_codec():
    v = Verdict(session="s", round=1, base=3, n_accepted=1, token=5, verify_s=0.1, considered=2, batch=16,
                token_s=0.004)
    back = decode_any(v.encode())
    assert (back.considered, back.batch, back.token_s) == (2, 16, 0.004)
    plain = decode_any(Verdict(session="s", round=1, base=3, n_accepted=1, token=5, verify_s=0.1).encode())
    assert (plain.considered, plain.batch, plain.token_s) == (None, 1, 0.0)
    busy = decode_any(ErrorReply(code="busy", message="full", retry_s=0.25).encode())
    assert busy.retry_s == 0.25
    with pytest.raises(Exception, match="considered"):
        Verdict(session="s", round=1, base=3, n_accepted=2, token=5, verify_s=0.1, considered=1).encode()


class _BusyThenServe:
    """An edge that answers `busy` the first `times` rounds it sees, then verifies."""

    def __init__(self, core: VerifierCore, times: int, retry_s: float) -> None:
        self.core, self.times, self.retry_s, self.sent = core, times, retry_s, []

    async def exchange(self, uplink: bytes, req) -> bytes:
        self.sent.append(asyncio.get_running_loop().time())
        if len(self.sent) <= self.times:
            return ErrorReply(code="busy", message="full", retry_s=self.retry_s).encode()
        return verify_bytes(self.core, uplink)


def test_a_device_waits_out_busy_and_then_completes_unchanged(target, draft):
    [session] = _sessions(target, draft, 1, temperature=0.0)
    edge = _BusyThenServe(VerifierCore(target), times=2, retry_s=0.05)
    result = asyncio.run(speculate(session, edge, decode=target.decode))
    [again] = _sessions(target, draft, 1, temperature=0.0)
    assert result.token_ids == _rounds_lockstep(target, [again])[1][0]
    assert edge.sent[1] - edge.sent[0] >= 0.05 and edge.sent[2] - edge.sent[1] >= 0.05  # the hint honoured


def test_busy_until_the_deadline_is_deadline_exceeded(target, draft):
    [session] = _sessions(target, draft, 1, temperature=0.0)
    session.deadline = time.time() + 0.3
    with pytest.raises(RemoteError, match="deadline_exceeded"):
        asyncio.run(speculate(session, _BusyThenServe(VerifierCore(target), times=10**6, retry_s=0.1),
                              decode=target.decode))


async def test_a_pass_waits_briefly_for_sessions_still_drafting_but_a_lone_session_never_waits(target, draft):
    core = VerifierCore(target, max_sessions=8)
    with ThreadPoolExecutor(1) as worker:
        batcher = Batcher(core, worker, budget=64, max_queue=16, hold=100.0, max_hold_s=0.5)
        runner = asyncio.create_task(batcher.run())
        a, b, c = _sessions(target, draft, 3, temperature=0.0)

        async def round_of(session, delay: float = 0.0):
            await asyncio.sleep(delay)
            req = session.next_request()[0]
            session.apply(req, decode_any(await batcher.submit(req)))

        await asyncio.gather(round_of(a), round_of(b))
        assert core.forwards == 1
        await asyncio.gather(round_of(a), round_of(b, delay=0.05))  # b drafts longer: a's pass waits for it
        assert (core.forwards, core.batch_rows) == (2, 4)
        batcher.closed(a.session)
        batcher.closed(b.session)
        await round_of(c)
        t0 = time.perf_counter()
        await round_of(c)  # alone: nobody else is expected, so no hold
        assert time.perf_counter() - t0 < 0.25
        runner.cancel()
