"""Greedy exactness on real weights: speculative output == the target's own transformers `generate`.

The default suite checks one bench prompt (code) with the int8 draft; `-m slow` runs three (one chat, one
code, one story) with both drafts, and all of `shared/bench/prompts.jsonl`; `-m qwen` the Qwen2.5-Coder
pair, and drafts with other tokenizers (SmolLM2, Gemma 3) for it. A token may only differ where the
target's float32 logits of the two candidates are a near-tie (|gap| < NEAR_TIE): there a multi-token verify
forward sums in another order than generate's one-token steps and may flip the argmax legitimately.
"""

from __future__ import annotations

import pytest

from draftwire.services.cli.remote import load_prompts
from draftwire.services.cli.selfcheck import run_selfcheck
from draftwire.shared.models.runtime import load_model

NEAR_TIE = 1e-3
SUBSET = ("p00", "p06", "p12")


def _check(report: dict, n_prompts: int) -> None:
    for label, agg in report["pairs"].items():
        assert agg["tokens"] == 48 * n_prompts, label
        for m in agg["mismatches"]:
            assert abs(m["target_logit_gap"]) < NEAR_TIE, f"{label}: {m} is not a near-tie"
        assert agg["identical"] + len(agg["mismatches"]) == n_prompts
        assert 0 < agg["acceptance_rate"] <= 1


@pytest.fixture(scope="module")
def smollm2():
    target = load_model("smollm2-135m", "fp32", progress=False)
    drafts = {dt: load_model("smollm2-135m", dt, progress=False) for dt in ("int8", "bf16")}
    return target, drafts


def test_greedy_exact_smollm2_one_prompt(smollm2) -> None:
    target, drafts = smollm2
    prompts = [p for p in load_prompts(None, 1000) if p["id"] == "p06"] or load_prompts(None, 1)
    report = run_selfcheck(prompts, target, {"int8": drafts["int8"]}, ["full", "tkslt", "dssd"], 48)
    _check(report, len(prompts))


@pytest.mark.slow
def test_greedy_exact_smollm2_subset(smollm2) -> None:
    target, drafts = smollm2
    prompts = [p for p in load_prompts(None, 1000) if p["id"] in SUBSET] or load_prompts(None, 3)
    report = run_selfcheck(prompts, target, drafts, ["full", "tkslt", "dssd"], 48)
    _check(report, len(prompts))


@pytest.mark.slow
def test_greedy_exact_smollm2_all_prompts(smollm2) -> None:
    target, drafts = smollm2
    prompts = load_prompts(None, 1000)
    _check(run_selfcheck(prompts, target, drafts, ["full", "tkslt", "dssd"], 48), len(prompts))


@pytest.mark.qwen
def test_greedy_exact_qwen_subset() -> None:
    target = load_model("qwen2.5-coder-1.5b", "fp32", progress=False)
    draft = load_model("qwen2.5-coder-1.5b", "int8", progress=False)
    prompts = [p for p in load_prompts(None, 1000) if p["id"] in SUBSET]
    _check(run_selfcheck(prompts, target, {"int8": draft}, ["tkslt"], 48), len(prompts))


@pytest.mark.qwen
def test_greedy_exact_qwen_with_drafts_of_other_tokenizers() -> None:
    """SmolLM2 (49,152 ids, its own BPE) drafting for Qwen on every bench prompt, Gemma 3 (262,144 ids,
    sentencepiece) on the subset: token ids equal Qwen's own greedy `generate` (docs/cross_tokenizer.md)."""
    target = load_model("qwen2.5-coder-1.5b", "fp32", progress=False)
    prompts = load_prompts(None, 1000)
    smollm2 = load_model("smollm2-135m", "int8", progress=False)
    report = run_selfcheck(prompts, target, {"smollm2-int8": smollm2}, ["tkslt"], 48)
    _check(report, len(prompts))
    gemma = load_model("gemma3-270m", "int8", progress=False)
    subset = [p for p in prompts if p["id"] in SUBSET]
    _check(run_selfcheck(subset, target, {"gemma3-int8": gemma}, ["tkslt", "dssd"], 48), len(subset))
