"""Stop strings (OpenAI's `stop`): where the text ends, what may be streamed, and the speculation loop's cut."""

from __future__ import annotations

import asyncio

import pytest

from draftwire.services.draft.service import TextStream
from draftwire.shared.core.stop_strings import find_stop, streamable


@pytest.mark.parametrize(("text", "stops", "start", "expected"), [
    ("hello world", ["world"], 0, 6),
    ("hello world", ["xyz"], 0, None),
    ("a\n\nb\n\n", ["\n\n"], 0, 1),
    ("abcSTOPdefEND", ["END", "STOP"], 0, 3),  # the earliest of several
    ("abcSTOP", ["STOP"], 5, 3),  # a match that began before `start` but ends after it
    ("STOPabc", ["STOP"], 7, None),  # ended before start - len + 1: already checked
    ("anything", [], 0, None),
])
def test_find_stop(text, stops, start, expected):
    assert find_stop(text, stops, start) == expected


@pytest.mark.parametrize(("text", "stops", "expected"), [
    ("hello wor", ["world"], 6),  # "wor" may become "world": held back
    ("hello", ["world"], 5),
    ("ab\n", ["\n\n"], 2),
    ("abc", ["bcd", "c"], 1),  # "bc" may grow into "bcd" (the whole "c" is find_stop's job)
    ("", ["x"], 0),
])
def test_streamable_holds_back_what_may_grow_into_a_stop(text, stops, expected):
    assert streamable(text, stops) == expected


def test_a_stream_never_sends_the_stop_string_or_what_follows_it():
    pieces = ["Hel", "lo", " wo", "rl", "d and more", " text"]
    vocab = {i: p for i, p in enumerate(pieces)}
    stream = TextStream(lambda ids: "".join(vocab[i] for i in ids), stops=["world"])
    sent = "".join(stream.push([i]) for i in range(len(pieces)))
    assert sent == "Hello "
    plain = TextStream(lambda ids: "".join(vocab[i] for i in ids))
    assert "".join(plain.push([i]) for i in range(len(pieces))) == "".join(pieces)


def test_the_speculation_loop_ends_at_a_stop_string_and_cuts_text_and_tokens():
    """Through the in-process engine (the same loop the draft service runs): greedy, tiny models."""
    from draftwire.shared.core.params import SamplingParams, SpecParams
    from draftwire.shared.core.speculation import LocalEngine
    from draftwire.shared.models.runtime import load_model

    target = load_model("tiny-random", "fp32")
    engine = LocalEngine(target, target)
    sampling = SamplingParams(temperature=0.0, seed=1, max_new_tokens=40, min_new_tokens=40)
    full = engine.generate("hello", sampling, SpecParams(mode="tkslt", gamma=4, k=8))
    text = full.text
    stop = text[10:13]  # a string the greedy output is known to contain
    cut = asyncio.run(_with_stop(engine, sampling, stop))
    at = text.find(stop)
    assert cut.finish_reason == "stop" and cut.text == text[:at]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids
    assert stop in target.decode(cut.token_ids) and stop not in target.decode(cut.token_ids[:-1])


async def _with_stop(engine, sampling, stop):
    return await engine.agenerate("hello", sampling, _spec(), stop=(stop,))


def _spec():
    from draftwire.shared.core.params import SpecParams

    return SpecParams(mode="tkslt", gamma=4, k=8)
