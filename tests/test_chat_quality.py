"""Chat answers through the chat template are not empty (the failure raw completions showed: the target
gave its end-of-turn token a third of the mass right away). Real SmolLM2 weights: `-m slow`."""

from __future__ import annotations

import pytest

from draftwire.shared.bench import load_set
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.models.runtime import load_model


@pytest.fixture(scope="module")
def engine():
    target = load_model("smollm2-135m", "fp32", progress=False)
    return target, LocalEngine(target, load_model("smollm2-135m", "int8", progress=False))


@pytest.mark.slow
def test_the_haiku_prompt_at_temperature_0_8_over_10_seeds_is_never_empty(engine):
    target, eng = engine
    ids = target.render_chat([("user", "Write a haiku about the sea.")])
    texts = [eng.generate(ids, SamplingParams(temperature=0.8, seed=seed, max_new_tokens=48),
                          SpecParams(mode="tkslt")).text for seed in range(10)]
    assert all(t.strip() for t in texts), texts


@pytest.mark.slow
def test_the_chat_set_greedy_has_no_empty_answer(engine):
    target, eng = engine
    rows = load_set()
    assert len(rows) >= 30
    empty = []
    for row in rows:
        ids = target.render_chat([(m["role"], m["content"]) for m in row["messages"]])
        result = eng.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=24), SpecParams(mode="tkslt"))
        if not result.text.strip():
            empty.append(row["id"])
    assert empty == []


def test_a_missing_prompt_set_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_set(tmp_path / "nope.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_set(tmp_path / "bad.jsonl")
