"""The zero-token opening round (`speculate(open_early=True)`, what the draft service runs): the draft's
prefill runs while the target's does, and the output stays exactly the target's distribution."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import InProcessEdge, LocalEngine, new_session, speculate
from draftwire.shared.models.runtime import load_model
from tests.exact_distribution import chi_square_pvalue, exact_prefixes
from tests.test_chi_square import (
    FIRST_TOKENS_SAMPLES,
    GAMMA,
    PASS_P,
    REJECT_P,
    V,
    verifier_scores_with_the_next_row,
)
from tests.toy_models import bigram_pair


class OpeningEngine(LocalEngine):
    async def agenerate(self, prompt, params, spec, link=None, **kw):
        return await super().agenerate(prompt, params, spec, link, open_early=True, **kw)


def _pvalue(mode: str, temperature: float = 1.0) -> float:
    target, draft = bigram_pair(V, seed=5)
    engine = OpeningEngine(target, draft)
    spec = SpecParams(mode=mode, gamma=GAMMA, k=2, quant="f16")
    params = SamplingParams(temperature=temperature, max_new_tokens=GAMMA)

    async def run():
        return [(await engine.agenerate([0], dataclasses.replace(params, seed=s), spec)).token_ids
                for s in range(FIRST_TOKENS_SAMPLES)]

    return chi_square_pvalue(asyncio.run(run()), exact_prefixes(target, [0], params, GAMMA))


@pytest.mark.parametrize(("mode", "temperature"), [("tkslt", 1.0), ("dssd", 1.2), ("full", 0.8)])
def test_an_opening_round_keeps_the_target_s_distribution(mode, temperature):
    assert _pvalue(mode, temperature) > PASS_P


def test_the_same_statistic_rejects_a_verifier_that_scores_with_the_next_row(monkeypatch):
    verifier_scores_with_the_next_row(monkeypatch)
    assert _pvalue("tkslt") < REJECT_P


def test_greedy_output_is_unchanged_and_the_draft_prefills_while_the_target_does():
    target = load_model("tiny-random", "fp32")
    params = SamplingParams(temperature=0.0, seed=3, max_new_tokens=24, min_new_tokens=24)
    events: list[str] = []

    class Watched(InProcessEdge):
        async def exchange(self, uplink, req):
            events.append(f"sent {len(req.tokens)} history={req.history is not None}")
            await asyncio.sleep(0.05)  # the round is in flight: the draft's prefill must run now
            reply = await super().exchange(uplink, req)
            events.append("verdict")
            return reply

    async def compute(fn):
        name = getattr(getattr(fn, "func", fn), "__name__", "")
        if name == "warm_up":
            events.append("warm_up")
        return await asyncio.to_thread(fn)

    async def run(open_early: bool):
        engine = LocalEngine(target, target)
        session = new_session(target, target, target.eos_token_ids, target.vocab_size, "hello world", params,
                              SpecParams(mode="tkslt", gamma=4, k=8))
        return await speculate(session, Watched(engine.verifier), decode=target.decode, compute=compute,
                               open_early=open_early)

    plain = asyncio.run(run(False))
    events.clear()
    opened = asyncio.run(run(True))
    assert opened.token_ids == plain.token_ids
    assert opened.stats.rounds[0].drafted == 0 and opened.stats.rounds[1].drafted > 0
    # the prefill started while the opening round (no tokens, the history) was in flight
    assert sorted(events[:3]) == sorted(["sent 0 history=True", "warm_up", "verdict"]) and events[2] == "verdict"
    assert events[3].startswith("sent") and events[3].endswith("history=False")
