"""Draft length: the closed-form optimum against a grid, the online cost model, the policies, pipelining."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from scipy import special

from draftwire.shared.core import draft_length_policy as dl
from draftwire.shared.core.params import ParamError, SamplingParams, SpecParams
from draftwire.shared.core.speculation import InProcessEdge, LocalEngine, new_session, speculate
from draftwire.shared.core.verifier_sessions import VerifierCore
from tests.toy_models import bigram_pair


@pytest.mark.parametrize("x", [-0.3678, -0.367, -0.3, -0.2, -0.05, -1e-3, -1e-9, -1e-300])
def test_lambert_w_lower_branch_matches_scipy(x: float) -> None:
    want = float(special.lambertw(x, -1).real)
    assert dl.lambert_w_lower(x) == pytest.approx(want, rel=1e-9)
    assert dl.lambert_w_lower(-1 / math.e) == -1.0  # the branch point


def test_lambert_w_rejects_outside_domain() -> None:
    for x in (-0.5, 0.0, 0.1):
        with pytest.raises(ValueError):
            dl.lambert_w_lower(x)


def _grid_best_real(alpha: float, c: float, b: float) -> float:
    grid = np.linspace(0, 200, 2_000_001)
    s = (1 - alpha ** (grid + 1)) / ((1 - alpha) * (c * grid + b))
    return float(grid[int(np.argmax(s))])


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.8, 0.9, 0.97])
@pytest.mark.parametrize("c,b", [(0.05, 1.0), (0.2, 1.5), (0.01, 3.0), (0.5, 0.6), (1.0, 0.5)])
def test_closed_form_matches_grid_search(alpha: float, c: float, b: float) -> None:
    got = dl.optimal_gamma_real(alpha, c, b)
    assert got == pytest.approx(_grid_best_real(alpha, c, b), abs=2e-4)
    best_int = max(range(1, 17), key=lambda g: dl.speedup(alpha, g, c, b))
    assert dl.optimal_gamma(alpha, c, b, 16) == best_int


def test_optimum_moves_the_right_way() -> None:
    """Dearer rounds (RTT) want longer drafts; dearer draft tokens (uplink bytes) want shorter ones."""
    base = dl.optimal_gamma_real(0.8, 0.1, 1.0)
    assert dl.optimal_gamma_real(0.8, 0.1, 3.0) > base > dl.optimal_gamma_real(0.8, 0.5, 1.0)
    assert dl.optimal_gamma_real(0.95, 0.1, 1.0) > base
    assert dl.optimal_gamma(0.8, 0.0, 1.0, 12) == 12  # free drafting: as long as allowed


def test_cost_model_learns_alpha_per_token_and_fixed_costs() -> None:
    rng = np.random.default_rng(0)
    model = dl.CostModel(decay=0.98)
    spb, fixed, per_tok = 4e-6, 0.050, 0.010  # 250 kB/s uplink, 50 ms per round, 10 ms per draft token
    for _ in range(300):
        g = int(rng.integers(1, 9))
        acc = min(int(rng.geometric(1 - 0.75)) - 1, g)
        up = 200 + 1000 * g
        draft = per_tok * g
        model.observe(dl.RoundObservation(g, acc, draft, draft + fixed + spb * up, up))
    c, b = model.costs()
    assert model.alpha == pytest.approx(0.75, abs=0.06)
    assert model.wait_per_token == pytest.approx(1000 * spb, rel=0.02)
    assert c == pytest.approx(per_tok + 1000 * spb, rel=0.03)
    assert b == pytest.approx(fixed + 200 * spb, rel=0.05)


def test_adaptive_policy_follows_the_costs() -> None:
    cheap_rounds, dear_rounds = dl.AdaptiveGamma(4), dl.AdaptiveGamma(4)
    assert cheap_rounds.next_gamma() == 4  # nothing measured yet
    for g in (2, 3, 4, 5, 6) * 10:
        cheap_rounds.observe(dl.RoundObservation(g, g - 1, 0.01 * g, 0.01 * g + 0.005, 10 * g))
        dear_rounds.observe(dl.RoundObservation(g, g - 1, 0.01 * g, 0.01 * g + 0.300, 10 * g))
    assert dear_rounds.next_gamma() > cheap_rounds.next_gamma() >= 1


def test_a_busier_edge_shortens_the_draft() -> None:
    """Load-aware: the same rounds at a batched edge, where each verified token costs the other sessions of the
    forward pass the edge's marginal token time, choose a shorter gamma than alone; batch 1 changes nothing."""
    alone, shared, busy = dl.AdaptiveGamma(4), dl.AdaptiveGamma(4), dl.AdaptiveGamma(4)
    for g in (2, 3, 4, 5, 6) * 10:
        rounds = {"drafted": g, "accepted": min(g, 4), "draft_s": 0.01 * g, "round_s": 0.01 * g + 0.2,
                  "uplink_bytes": 10 * g}
        alone.observe(dl.RoundObservation(**rounds))
        shared.observe(dl.RoundObservation(**rounds, batch=1, verify_token_s=0.006))
        busy.observe(dl.RoundObservation(**rounds, batch=16, verify_token_s=0.006))
    assert shared.next_gamma() == alone.next_gamma()
    assert busy.model.costs()[0] == pytest.approx(alone.model.costs()[0] + 15 * 0.006, rel=0.02)
    assert busy.next_gamma() < alone.next_gamma()
    # the present batch, not the past ones: one round alone after the burst and the load term is gone
    rounds = {"drafted": 4, "accepted": 4, "draft_s": 0.04, "round_s": 0.24, "uplink_bytes": 40}
    for policy in (alone, busy):
        policy.observe(dl.RoundObservation(**rounds, batch=1, verify_token_s=0.006))
    assert busy.model.costs()[0] == pytest.approx(alone.model.costs()[0], rel=1e-6)


def test_prefill_rounds_teach_alpha_but_not_costs() -> None:
    """A session's first round carries the prompt's prefill: a one-off cost that must not read as per-token."""
    per_tok, fixed, prefill = 0.07, 0.25, 0.06
    flagged, unflagged = dl.AdaptiveGamma(4), dl.AdaptiveGamma(4)
    for policy, mark in ((flagged, True), (unflagged, False)):
        g = policy.next_gamma()
        policy.observe(dl.RoundObservation(g, g, (per_tok + 0.02) * g, (per_tok + 0.02) * g + fixed + prefill,
                                           40 * g, prefill=mark))
        for _ in range(3):  # then what the rounds really cost: no per-token wait at all
            g = policy.next_gamma()
            policy.observe(dl.RoundObservation(g, g - 1, per_tok * g, per_tok * g + fixed, 40 * g))
    assert flagged.model.rounds == 4 and flagged.model.timed_rounds == 3
    only_prefill = dl.CostModel()
    only_prefill.observe(dl.RoundObservation(4, 4, 0.3, 0.6, 160, prefill=True))
    assert only_prefill.alpha > dl.CostModel().alpha  # acceptance counts...
    assert only_prefill.costs() == (0.0, 0.0) and not only_prefill.rounds_seen  # ...the times do not
    c, b = flagged.model.costs()
    assert c == pytest.approx(per_tok) and b == pytest.approx(fixed)
    c_biased, _ = unflagged.model.costs()
    assert c_biased > per_tok + 0.01  # the prefill read as a dearer draft token...
    assert flagged.next_gamma() > unflagged.next_gamma()  # ...and made the policy draft less


def test_engine_marks_first_and_resync_rounds_as_prefill() -> None:
    target, draft = bigram_pair(32, seed=6)
    seen: list[dl.RoundObservation] = []
    core = VerifierCore(target)

    class Recording(dl.FixedGamma):
        def observe(self, r: dl.RoundObservation) -> None:
            seen.append(r)
            if len(seen) == 3:
                core.close(session.session)  # the verifier forgets it: round 4 must resend the history

    params = SamplingParams(temperature=0, max_new_tokens=40)
    session = new_session(draft, draft, target.eos_token_ids, target.vocab_size, [1], params,
                          SpecParams(mode="tkslt", gamma=3, k=4))
    asyncio.run(speculate(session, InProcessEdge(core), decode=draft.decode, policy=Recording(3)))
    assert len(seen) > 5
    assert [i for i, r in enumerate(seen) if r.prefill] == [0, 3]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        dl.make_policy("magic", 4)
    with pytest.raises(ParamError, match="policy"):
        SpecParams(policy="magic")
    with pytest.raises(ParamError, match="confidence"):
        SpecParams(confidence=1.5)


@pytest.mark.parametrize("policy", ["adaptive", "confidence"])
def test_policies_keep_greedy_output_exact(policy: str) -> None:
    target, draft = bigram_pair(32, seed=6)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=0, max_new_tokens=60)
    want = engine.generate([3], params, SpecParams(mode="ar")).token_ids
    out = engine.generate([3], params, SpecParams(mode="tkslt", gamma=6, k=4, policy=policy, confidence=0.3))
    assert out.token_ids == want
    s = out.stats.summary()
    assert s["policy"] == policy and s["mean_gamma"] > 0


def test_confidence_stop_drafts_less_when_unsure() -> None:
    target, draft = bigram_pair(32, seed=6)
    engine = LocalEngine(target, draft)
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=60)
    fixed = engine.generate([3], params, SpecParams(mode="tkslt", gamma=6, k=8)).stats.summary()
    conf = engine.generate([3], params, SpecParams(mode="tkslt", gamma=6, k=8, policy="confidence",
                                                   confidence=0.6)).stats.summary()
    assert conf["drafted"] / conf["rounds"] < fixed["drafted"] / fixed["rounds"]
    assert conf["acceptance_rate"] > fixed["acceptance_rate"]


class _SlowLink(InProcessEdge):
    """The edge in this process behind a 20 ms round trip."""

    async def exchange(self, uplink, req):
        await asyncio.sleep(0.02)
        return await super().exchange(uplink, req)


async def _run(target, draft, params, spec):
    session = new_session(draft, draft, target.eos_token_ids, target.vocab_size, [1], params, spec)
    return await speculate(session, _SlowLink(VerifierCore(target)), decode=draft.decode, compute=asyncio.to_thread)


@pytest.mark.parametrize("mode,temperature", [("tkslt", 0.0), ("tkslt", 1.0), ("dssd", 0.8), ("full", 1.0)])
def test_pipelining_never_changes_tokens(mode: str, temperature: float) -> None:
    """Prefetched drafts are kept only when valid and are bit-identical to drafting afresh."""
    target, draft = bigram_pair(16, seed=8, agreement=0.9)
    params = SamplingParams(temperature=temperature, seed=42, max_new_tokens=50)
    plain = asyncio.run(_run(target, draft, params, SpecParams(mode=mode, gamma=3, k=6)))
    piped = asyncio.run(_run(target, draft, params, SpecParams(mode=mode, gamma=3, k=6, pipeline=True)))
    assert piped.token_ids == plain.token_ids
    s = piped.stats.summary()
    assert s["pipeline"] and s["prefetched"] > 0


def test_adaptive_sessions_start_from_what_earlier_ones_learnt() -> None:
    first = dl.make_policy("adaptive", 4)
    for g in (4, 2, 3, 5, 6, 4, 3) * 4:
        first.observe(dl.RoundObservation(g, g, 0.01 * g, 0.01 * g + 0.300, 10 * g))  # all accepted, dear rounds
    learnt = first.next_gamma()
    assert learnt > 4
    second = dl.make_policy("adaptive", 4, warm=first.model)
    assert second.next_gamma() == learnt  # no probing from scratch
    second.observe(dl.RoundObservation(1, 0, 0.01, 0.02, 10))
    assert first.model.rounds == 28  # the warm model is copied, never shared


def test_a_session_starts_from_what_sessions_at_its_load_learnt() -> None:
    lone, burst = dl.CostModel(), dl.CostModel()
    lone.observe(dl.RoundObservation(4, 4, 0.04, 0.10, 40))  # 10 ms a draft token alone
    burst.observe(dl.RoundObservation(2, 2, 0.20, 0.60, 20))  # 100 ms in a burst
    warm = dl.WarmStarts()
    key = ("tkslt", 8)
    assert warm.get(key, 1) is None
    warm.put(key, [1, 1, 1], lone)
    warm.put(key, [16, 16, 16, 16, 3], burst)  # at 16 sessions but for its last round
    warm.put(key, [], dl.CostModel())  # a session without rounds learnt nothing
    assert warm.get(key, 1) is lone  # the lone request after a burst does not inherit the burst's costs
    assert warm.get(key, 16) is burst and warm.get(key, 9) is burst
    assert warm.get(key, 2) is lone  # the nearest band that has anything
    assert warm.get(("dssd", 8), 1) is None  # per mode and K
    assert [dl.load_band(n) for n in (0, 1, 2, 3, 4, 7, 8, 16)] == [1, 1, 2, 2, 3, 3, 4, 5]
