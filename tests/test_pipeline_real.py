"""Pipelining (PEARL) on a real transformer: tiny random Llamas with their KV caches, not the bigram toy.

While a round is verified the draft drafts on; the pre-drafted block is kept only when the round accepted
everything and the target's token is the draft's guess. Every position draws its own seeded uniform, so a
pipelined generation must be token-identical to the unpipelined one with the same seed, greedy or sampled,
in every mode, while its rounds really reject (both KV caches roll back) and really reuse pre-drafted
tokens. Its output must also be distributed as the target's.

Keeping a block that should have been dropped (`Prefetch.matches` always true) leaves the output
distribution intact (each token is still tested against the proposal it was drawn from), so no chi-square
can see it; the identity test does, and is shown to.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from draftwire.shared.core.draft_session import Prefetch
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.models.runtime import load_model
from tests.exact_distribution import by_rank, conditional_pvalue, generate_seeds
from tests.toy_models import blend, tiny_llama

PROMPT = "hello"
DRAFT_WEIGHT = 0.04  # the draft is 4% of the way to an unrelated model: acceptance ~0.7 at temperature 0.3
GAMMA = 3
SAMPLED = {"temperature": 0.3, "top_p": 0.6}  # peaked enough that the draft's guess is often the target's


@pytest.fixture(scope="module")
def pair():
    target = load_model("tiny-random", "fp32", progress=False)
    return target, blend(target, tiny_llama(seed=1), DRAFT_WEIGHT)


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and two threads spin against any other process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def crops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every KV-cache rollback (DynamicCache.crop) made while the test runs, with how many tokens it drops."""
    seen: list[int] = []
    crop = DynamicCache.crop

    def counting(self, max_length: int) -> None:
        seen.append(max_length)
        crop(self, max_length)

    monkeypatch.setattr(DynamicCache, "crop", counting)
    return seen


def _both(engine: LocalEngine, prompt: list[int], params: SamplingParams, mode: str):
    spec = SpecParams(mode=mode, gamma=GAMMA, k=8)
    plain = engine.generate(prompt, params, spec)
    piped = engine.generate(prompt, params, SpecParams(mode=mode, gamma=GAMMA, k=8, pipeline=True))
    return plain, piped


@pytest.mark.parametrize("mode", ["full", "tkslt", "dssd"])
@pytest.mark.parametrize("sampling", ["greedy", "sampled"])
def test_pipelined_output_is_token_identical(pair, crops, mode: str, sampling: str) -> None:
    target, draft = pair
    engine = LocalEngine(target, draft)
    prompt = target.encode(PROMPT)
    warp = SAMPLED if sampling == "sampled" else {"temperature": 0.0}
    prefetched = rejections = 0
    for seed in range(3):
        params = SamplingParams(**warp, seed=seed, max_new_tokens=40)
        plain, piped = _both(engine, prompt, params, mode)
        assert piped.token_ids == plain.token_ids, f"seed {seed}"
        assert len(piped.token_ids) == 40 or piped.finish_reason == "stop"
        summary = piped.stats.summary()
        prefetched += summary["prefetched"]
        rejections += summary["rejections"]
    assert prefetched > 0, "no pre-drafted token was ever kept: the pipelined path was not exercised"
    assert rejections > 0, "no round rejected: nothing was rolled back"
    assert crops, "no KV cache was ever cropped"


def test_keeping_a_block_it_should_drop_is_caught(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control of the identity test: the bug changes tokens (not their distribution)."""
    target, draft = pair
    engine = LocalEngine(target, draft)
    prompt = target.encode(PROMPT)
    monkeypatch.setattr(Prefetch, "matches", lambda self, committed: True)
    differ = 0
    for seed in range(3):
        plain, piped = _both(engine, prompt, SamplingParams(**SAMPLED, seed=seed, max_new_tokens=40), "tkslt")
        differ += piped.token_ids != plain.token_ids
    assert differ > 0


CHI_SQUARE_SAMPLES = 150
PASS_P = 1e-3


@pytest.mark.parametrize("mode", ["tkslt", pytest.param("dssd", marks=pytest.mark.slow)])
def test_pipelined_output_is_distributed_as_the_target(pair, mode: str) -> None:
    """Every token of 150 pipelined 16-token generations against the target's row given its prefix."""
    target, draft = pair
    prompt = target.encode(PROMPT)
    params = SamplingParams(**SAMPLED, max_new_tokens=16)
    spec = SpecParams(mode=mode, gamma=GAMMA, k=8, pipeline=True)
    outputs = generate_seeds(LocalEngine(target, draft), prompt, params, spec, CHI_SQUARE_SAMPLES)
    assert conditional_pvalue(target, prompt, params, outputs, by_rank(4)) > PASS_P
