"""`draftwire loadtest`: its figures from synthetic runs, the replay pieces in process, and tiny runs end to end
through the services (with --check-identical) and in replay mode."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest
import torch

from draftwire.services.cli.loadtest import (
    _add_logit_gaps,
    capacity_ratios,
    find_mismatches,
    first_difference,
    level_summary,
    logit_gap,
    percentile,
    replay_summary,
    verifier_figures,
)
from draftwire.services.cli.main import main
from draftwire.shared.core import session_digest
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.proposal import ProposalBlock, quantize
from draftwire.shared.core.protocol import ErrorReply, Verdict, VerifyRequest
from draftwire.shared.core.replay import (
    Exchange,
    ReplayTally,
    compare_verdict,
    record,
    retry_hint,
    rewrite_session,
)
from draftwire.shared.core.verifier_sessions import VerifierCore
from tests.toy_models import bigram_pair


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_level_summary_counts_tokens_latencies_and_errors():
    runs = [
        {"tokens": 4, "started": 0.0, "finished": 2.0, "chunks": [(0.5, 1), (1.0, 2), (2.0, 1)], "error": None},
        {"tokens": 0, "started": 0.0, "finished": 0.1, "chunks": [], "error": "busy"},
    ]
    row = level_summary(2, 2.0, runs)
    assert row["completed"] == 1 and row["busy"] == 1 and row["errors"] == {"busy": 1}
    assert row["aggregate_tokens_per_s"] == pytest.approx(2.0)
    assert row["ttft_p50_s"] == pytest.approx(0.5)
    # gaps: 0.5 s for 2 tokens (0.25 each), then 1.0 s for 1 token
    assert row["itl_p50_s"] == pytest.approx(0.25) and row["itl_p99_s"] == pytest.approx(1.0)
    assert row["session_tokens_per_s_p50"] == pytest.approx(2.0)


def test_verifier_figures_are_per_level_deltas_and_none_when_not_reported():
    before = {"model": "m", "forwards": 10, "batch_rows": 20, "forward_tokens": 100, "busy": 1, "queue": 5}
    after = {"model": "m", "forwards": 20, "batch_rows": 60, "forward_tokens": 300, "busy": 4, "queue": 2,
             "budget": 64, "peak_rss_mb": 700}
    fig = verifier_figures(before, after)
    assert fig == {"verifier_forwards": 10, "batch_occupancy": 4.0, "tokens_per_forward": 20.0,
                   "verifier_busy": 3, "verifier_queue": 2, "verifier_budget": 64, "verifier_peak_rss_mb": 700}
    old = {"model": "m", "sessions": 3, "rounds": 9}  # a verifier from before batching
    assert set(verifier_figures(old, old).values()) == {None}
    assert set(verifier_figures(None, None).values()) == {None}
    idle = verifier_figures(after, after)  # no forward in the level: no occupancy to speak of
    assert idle["verifier_forwards"] == 0 and idle["batch_occupancy"] is None and idle["verifier_busy"] == 0
    assert verifier_figures(after, before)["verifier_forwards"] is None  # counters went back: a restart


def test_capacity_ratio_is_over_the_one_session_level_run_last_before_it():
    rows = [{"sessions": 1, "x": 10.0}, {"sessions": 4, "x": 35.0}, {"sessions": 16, "x": 38.0}]
    assert capacity_ratios(rows, "x") == [1.0, 3.5, 3.8]
    assert capacity_ratios(rows[::-1], "x") == [3.8, 3.5, 1.0]  # none before: the first one-session level
    assert capacity_ratios(rows[1:], "x") == [1.0, pytest.approx(38 / 35)]  # none at all: the first level
    assert capacity_ratios([{"sessions": 1, "x": 0.0}], "x") == [None]
    repeated = [{"sessions": n, "x": x} for n, x in [(1, 10.0), (16, 40.0), (1, 20.0), (16, 60.0)]]
    assert capacity_ratios(repeated, "x") == [1.0, 4.0, 1.0, 3.0]  # each 16 over the request just before it


def test_mismatches_name_the_first_differing_position():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    assert first_difference([], [4]) == 0
    alone = {0: [5, 6, 7, 8], 1: [1, 2]}
    runs = [
        {"id": "a", "prompt_index": 0, "token_ids": [5, 6, 7, 8], "error": None},
        {"id": "b", "prompt_index": 0, "token_ids": [5, 6, 9, 8], "error": None},
        {"id": "c", "prompt_index": 1, "token_ids": [1], "error": None},
        {"id": "d", "prompt_index": 1, "token_ids": [], "error": "busy"},  # failed: nothing to compare
        {"id": "e", "prompt_index": 2, "token_ids": [3], "error": None},  # its prompt was not served alone
    ]
    checked, found = find_mismatches(runs, alone)
    assert checked == 3
    assert found == [
        {"id": "b", "prompt_index": 0, "position": 2, "alone_token": 7, "got_token": 9},
        {"id": "c", "prompt_index": 1, "position": 1, "alone_token": 2, "got_token": None},
    ]


def test_logit_gap_is_at_the_first_differing_position_after_the_alone_prefix():
    from draftwire.shared.models.runtime import load_model

    target = load_model("tiny-random", "fp32", False)
    prompt = target.encode("hello there")
    alone = [40, 41, 42, 43]
    with torch.no_grad():
        full = target.model(torch.tensor([[*prompt, *alone]])).logits[0].double().numpy()
    want = full[len(prompt) + 2 - 1]  # the choice of generated token 2, after prompt + alone[:2]
    top = np.sort(want)[::-1]
    got = logit_gap(target, prompt, alone[:2], (alone[2], 7))
    assert got["top1"] == int(np.argmax(want))
    assert got["top1_minus_top2"] == pytest.approx(top[0] - top[1], abs=1e-4)
    assert got["logits"]["7"] == pytest.approx(want[7], abs=1e-4)
    assert got["logits"][str(alone[2])] == pytest.approx(want[alone[2]], abs=1e-4)
    # the loadtest fills every mismatch in; EOS is masked as the verifier masks it before min_new_tokens
    row = {"identical": {"details": [{"prompt_index": 0, "position": 2, "alone_token": alone[2], "got_token": 7}]}}
    args = argparse.Namespace(target_model="tiny-random", target_dtype="fp32", max_new_tokens=4)
    _add_logit_gaps(args, [row], [{"id": "0", "prompt": "hello there"}], {0: alone})
    detail = row["identical"]["details"][0]
    assert detail["top1_minus_top2"] == pytest.approx(got["top1_minus_top2"], abs=1e-4)
    assert detail["top1"] not in target.eos_token_ids


def _request(**kw) -> VerifyRequest:
    vocab = 50
    history = np.array([3, 1, 4, 1, 5], np.int64)
    rows = [(np.array([2, 7, 9]), quantize(np.array([0.5, 0.3, 0.2]), "f16")),
            (np.array([1, 9]), quantize(np.array([0.6, 0.4]), "f16"))]
    return VerifyRequest(**{
        "session": "0123456789abcdef", "round": 0, "base": 5, "last_token": 5, "tokens": np.array([7, 9], np.int64),
        "proposals": ProposalBlock.from_rows(rows, vocab, "f16"), "vocab_size": vocab, "history": history,
        "params": SamplingParams(temperature=0.0, max_new_tokens=8, min_new_tokens=8), "prompt_len": 3,
        "sent_at": 11.5, "digest": session_digest.of(history), "deadline": 1234.5, **kw})


def test_rewrite_session_changes_only_the_id_and_send_time():
    req = _request()
    out = VerifyRequest.decode(rewrite_session(req, "fedcba9876543210"))
    assert out.session == "fedcba9876543210"
    assert out == VerifyRequest(**{**req.__dict__, "session": "fedcba9876543210"})
    later = VerifyRequest.decode(rewrite_session(req, "fedcba9876543210", sent_at=99.0))
    assert later.sent_at == 99.0 and later == VerifyRequest(**{**out.__dict__, "sent_at": 99.0})
    cont = _request(round=3, base=9, last_token=2, history=None, params=None, prompt_len=None, deadline=0.0,
                    digest=session_digest.of([3, 1, 4, 1, 5, 9, 2, 6, 2]))
    assert VerifyRequest.decode(rewrite_session(cont, "s2")) == VerifyRequest(**{**cont.__dict__, "session": "s2"})


def test_compare_verdict_tells_the_same_decision_from_a_budget_cut_and_a_flip():
    req = _request(tokens=np.array([7, 9, 4], np.int64), proposals=None, draft_probs=None, params=None, history=None,
                   prompt_len=None, deadline=0.0, base=9, round=2)
    rec = Verdict(session="aaaa", round=2, base=9, n_accepted=2, token=11, verify_s=0.3, sent_at=5.0)

    def got(**kw) -> Verdict:
        return Verdict(**{**rec.__dict__, "session": "bbbb", "verify_s": 0.01, "sent_at": 9.0, **kw})

    assert compare_verdict(req, rec, got()) is None  # another session id, other timings: the same decision
    assert compare_verdict(req, rec, got(token=12)) == "diverged"
    assert compare_verdict(req, rec, got(n_accepted=3, token=4)) == "diverged"
    assert compare_verdict(req, rec, got(n_accepted=1, token=9)) == "budget_cut"  # verified 1: took draft token 2
    assert compare_verdict(req, rec, got(n_accepted=0, token=7)) == "budget_cut"
    assert compare_verdict(req, rec, got(n_accepted=1, token=5)) == "diverged"
    assert compare_verdict(req, rec, got(base=10)) == "diverged"


def test_retry_hint_is_the_refusals_own_capped():
    assert retry_hint(ErrorReply("busy", "queue full")) is None
    assert retry_hint(ErrorReply("busy", "queue full", retry_s=0.25)) == pytest.approx(0.25)
    assert retry_hint(ErrorReply("busy", "queue full", retry_s=60.0), cap=2.0) == 2.0


def test_replay_tally_counts_verified_tokens_and_stops_on_a_different_verdict():
    req = _request(tokens=np.array([7, 9], np.int64), history=None, params=None, prompt_len=None, deadline=0.0,
                   base=9, round=2)
    rec = Verdict(session="aaaa", round=2, base=9, n_accepted=2, token=11, verify_s=0.3)
    tally = ReplayTally()
    assert tally.verdict(Exchange(req, rec), Verdict(**{**rec.__dict__, "session": "b"}), 0.1)
    assert not tally.verdict(Exchange(req, rec), Verdict(**{**rec.__dict__, "token": 3}), 0.3)
    assert not tally.verdict(Exchange(req, rec), Verdict(**{**rec.__dict__, "n_accepted": 1, "token": 9}), 0.2)
    tally.busy, tally.sessions, tally.completed = 4, 3, 1
    assert tally.rounds == 3 and tally.tokens == 3 + 3 + 2
    assert tally.stopped == {"diverged": 1, "budget_cut": 1}
    assert tally.divergences == [{"round": 2, "base": 9, "recorded": [2, 11], "got": [2, 3]}]
    row = replay_summary(4, 2.0, tally)
    assert row["verified_tokens_per_s"] == pytest.approx(4.0) and row["rounds_per_s"] == pytest.approx(1.5)
    assert row["round_p50_s"] == pytest.approx(0.2) and row["round_p99_s"] == pytest.approx(0.3)
    assert row["busy"] == 4 and row["replayed_sessions"] == 3 and row["completed"] == 1


def test_recorded_rounds_replay_to_the_same_verdicts_under_a_new_session_id():
    target, draft = bigram_pair(12, seed=3)  # unrelated: greedy drafts are often rejected
    params = SamplingParams(temperature=0.0, max_new_tokens=12, min_new_tokens=12)
    recs = asyncio.run(record(draft, target, ["1 2", "5"], params, SpecParams(mode="tkslt", gamma=3, k=4)))
    assert [r.prompt_index for r in recs] == [0, 1]
    for rec in recs:
        first, *rest = rec.rounds
        assert first.request.history is not None and all(e.request.history is None for e in rest)
        assert rec.tokens == 12 or rec.tokens == 12 + 1  # the last round's bonus may run past the length
        assert any(e.verdict.n_accepted < len(e.request.tokens) for e in rec.rounds)  # rejections happen
    core = VerifierCore(target)
    for i, rec in enumerate(recs):  # the edge continues each replayed session from its own state
        for e in rec.rounds:
            got = core.handle(VerifyRequest.decode(rewrite_session(e.request, f"replayed-{i}")))
            assert got.session == f"replayed-{i}" and compare_verdict(e.request, e.verdict, got) is None
    other, _ = bigram_pair(12, seed=4)  # a different target decides otherwise
    wrong = VerifierCore(other)
    reasons = [compare_verdict(e.request, e.verdict, wrong.handle(e.request)) for e in recs[0].rounds[:1]]
    assert reasons == ["diverged"]


def test_loadtest_end_to_end_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "load"
    rc = main(["loadtest", "--draft-model", "tiny-random", "--draft-dtype", "fp32", "--target-model",
               "tiny-random", "--sessions", "1,3", "--max-new-tokens", "6", "--check-identical", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    levels = results["levels"]
    assert results["mode"] == "services (end to end)"
    assert [r["sessions"] for r in levels] == [1, 3] and [r["completed"] for r in levels] == [1, 3]
    assert all(r["aggregate_tokens_per_s"] > 0 and r["ttft_p50_s"] is not None for r in levels)
    assert [r["identical"]["checked"] for r in levels] == [1, 3]
    assert [r["identical"]["mismatches"] for r in levels] == [0, 0]
    assert sorted(results["alone_outputs"]) == ["0", "1", "2"]
    assert all(len(ids) == 6 for ids in results["alone_outputs"].values())
    assert levels[0]["capacity_ratio"] == 1.0 and "batch_occupancy" in levels[0]
    assert (out / "loadtest.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "| 3 | 3 |" in printed and "capacity ratio" in printed


def test_replay_end_to_end_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "replay"
    rc = main(["loadtest", "--replay", "--draft-model", "tiny-random", "--draft-dtype", "fp32", "--target-model",
               "tiny-random", "--sessions", "1,2", "--max-new-tokens", "6", "--replay-seconds", "0.5",
               "--recordings", "1", "--out", str(out)])  # both replayers replay one recording, as two sessions
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "replay (edge capacity)" and results["recorded_sessions"] == 1
    levels = results["levels"]
    assert [r["sessions"] for r in levels] == [1, 2]
    for r in levels:
        assert r["rounds"] > 0 and r["verified_tokens_per_s"] > 0 and r["round_p99_s"] is not None
        assert r["stopped"] == {} and r["completed"] >= 1  # every verdict as recorded alone
    assert levels[0]["capacity_ratio"] == 1.0
    printed = capsys.readouterr().out
    assert "replay (edge capacity)" in printed and "capacity ratio" in printed


def test_alone_baseline_is_the_same_prompts_served_one_at_a_time():
    from draftwire.services.cli.loadtest import alone_baseline

    alone = {0: [1] * 10, 1: [1] * 30}
    got = alone_baseline(4, 2, alone, {0: 1.0, 1: 2.0}, aggregate=40.0)  # prompts 0, 1, 0, 1: 80 tokens in 6 s
    assert got["alone_tokens_per_s"] == pytest.approx(80 / 6)
    assert got["over_alone"] == pytest.approx(40.0 / (80 / 6))
    assert alone_baseline(3, 3, alone, {0: 1.0, 1: 2.0}, 1.0)["over_alone"] is None  # prompt 2 never ran alone
