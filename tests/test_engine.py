"""The in-process engine end to end (drafting, codec, verification) on a toy bigram model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from draftwire.shared.core.params import ParamError, SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.core.warpers import warp
from tests.toy_models import BigramModel, bigram_pair

V = 4


def _joint_first_two(engine, spec, temperature, top_p, n):
    counts = np.zeros((V, V))
    for seed in range(n):
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=2)
        out = engine.generate([0], params, spec)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    return counts


def _expected_first_two(target: BigramModel, temperature: float, top_p: float) -> np.ndarray:
    p = warp(target.log_table, temperature, top_p)
    return p[0][:, None] * p


@pytest.mark.parametrize(
    "mode,temperature,top_p,quant",
    [("tkslt", 1.0, 1.0, "f16"), ("tkslt", 0.7, 0.9, "u8"), ("full", 1.3, 1.0, "f16"), ("dssd", 1.0, 1.0, "f16"),
     ("dssd", 0.8, 0.7, "u8")],
)
def test_engine_is_lossless(mode: str, temperature: float, top_p: float, quant: str) -> None:
    target, draft = bigram_pair(V, seed=5)
    spec = SpecParams(mode=mode, gamma=3, k=2, quant=quant)
    n = 3000
    counts = _joint_first_two(LocalEngine(target, draft), spec, temperature, top_p, n)
    expected = _expected_first_two(target, temperature, top_p) * n
    keep = expected > 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_greedy_matches_target_argmax_chain() -> None:
    target, draft = bigram_pair(max(V, 8), seed=9)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    want, t = [], 3
    for _ in range(20):
        t = int(np.argmax(target.log_table[t]))
        want.append(t)
    for mode in ("ar", "full", "tkslt", "dssd"):
        out = engine.generate([3], params, SpecParams(mode=mode, gamma=4, k=2))
        assert out.token_ids == want, mode
        assert out.finish_reason == "length"


def test_same_seed_same_output_and_stats_are_real() -> None:
    target, draft = bigram_pair(16, seed=2)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=1.0, seed=1234, max_new_tokens=30)
    spec = SpecParams(mode="tkslt", gamma=4, k=4)
    a, b = engine.generate([1], params, spec), engine.generate([1], params, spec)
    assert a.token_ids == b.token_ids
    s = a.stats.summary()
    assert s["new_tokens"] == 30 == sum(r.emitted for r in a.stats.rounds)
    assert 0 < s["accepted"] <= s["drafted"] <= 4 * s["rounds"]
    assert s["uplink_bytes"] > 0 and s["downlink_bytes"] > 0


def test_min_new_tokens_masks_eos() -> None:
    table = np.full((6, 6), 0.01)
    table[:, 5] = 0.95  # token 5 = EOS, overwhelmingly likely
    target = BigramModel(table / table.sum(1, keepdims=True), eos=(5,))
    draft = BigramModel(table / table.sum(1, keepdims=True), eos=(5,))
    engine = LocalEngine(target, draft)
    out = engine.generate([0], SamplingParams(temperature=0, max_new_tokens=10), SpecParams(gamma=3))
    assert out.token_ids == [5] and out.finish_reason == "stop"
    out = engine.generate(
        [0], SamplingParams(temperature=0, min_new_tokens=7, max_new_tokens=10), SpecParams(gamma=3)
    )
    assert len(out.token_ids) == 8 and out.token_ids[-1] == 5 and 5 not in out.token_ids[:-1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"max_new_tokens": 0},
        {"min_new_tokens": 9, "max_new_tokens": 8},
        {"seed": -1},
    ],
)
def test_bad_sampling_params(kwargs: dict) -> None:
    with pytest.raises(ParamError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"mode": "magic"}, {"gamma": 0}, {"gamma": 65}, {"k": 0}, {"quant": "f8"}, {"gamma": 2.5}]
)
def test_bad_spec_params(kwargs: dict) -> None:
    with pytest.raises(ParamError):
        SpecParams(**kwargs)


def test_dssd_uplink_is_tokens_and_their_probabilities_only() -> None:
    """DSSD sends ~10 bytes per drafted token up and a target row down only when it rejects."""
    target, draft = bigram_pair(512, seed=3)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=40)
    dssd = engine.generate([1], params, SpecParams(mode="dssd", gamma=4))
    full = engine.generate([1], params, SpecParams(mode="full", gamma=4))
    per_token = [r.uplink_bytes / 4 for r in dssd.stats.rounds[1:] if r.drafted == 4]
    per_token_full = [r.uplink_bytes / 4 for r in full.stats.rounds[1:] if r.drafted == 4]
    assert max(per_token) < min(per_token_full) / 20
    rejected = [r for r in dssd.stats.rounds if r.accepted < r.drafted]
    accepted = [r for r in dssd.stats.rounds if r.accepted == r.drafted]
    assert rejected and accepted
    assert min(r.downlink_bytes for r in rejected) > max(r.downlink_bytes for r in accepted)


def test_vocab_mismatch_is_refused() -> None:
    target, _ = bigram_pair(4, seed=1)
    _, other = bigram_pair(5, seed=1)
    with pytest.raises(ParamError, match="vocabulary"):
        LocalEngine(target, other)


@pytest.mark.parametrize("mode", ["tkslt", "dssd"])
def test_evicted_sessions_are_rebuilt_from_history_with_identical_output(mode: str) -> None:
    """A verifier holding one session serves two interleaved generations: every round evicts the other one,
    which then comes back as `unknown_session`, is resent with its history, and rebuilt. Same tokens."""
    import asyncio

    from draftwire.shared.core.speculation import InProcessEdge, new_session, speculate
    from draftwire.shared.core.verifier_sessions import VerifierCore

    target, draft = bigram_pair(16, seed=4)
    params = SamplingParams(temperature=1.0, seed=77, max_new_tokens=40)
    spec = SpecParams(mode=mode, gamma=3, k=4)
    want = LocalEngine(target, draft).generate([2], params, spec).token_ids

    class YieldingLink(InProcessEdge):
        async def exchange(self, uplink, req):
            await asyncio.sleep(0)  # let the other generation run a round in between
            return await super().exchange(uplink, req)

    core = VerifierCore(target, max_sessions=1)

    async def one(sid: str):
        s = new_session(draft, draft, target.eos_token_ids, target.vocab_size, [2], params, spec, sid)
        return await speculate(s, YieldingLink(core), decode=draft.decode)

    async def both():
        return await asyncio.gather(one("a"), one("b"))

    a, b = asyncio.run(both())
    assert a.token_ids == b.token_ids == want
    assert core.evictions >= 10
    assert sum(r.uplink_bytes for r in a.stats.rounds) > sum(
        r.uplink_bytes for r in LocalEngine(target, draft).generate([2], params, spec).stats.rounds
    )  # the resends with history are counted as real uplink bytes
