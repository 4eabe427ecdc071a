"""The draft service's pure pieces: a run's stop conditions and the context bound (no NATS, no model)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from draftwire.services.draft.service import Run, Stopped, context_error
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.prompt_request import GenerateJob
from draftwire.shared.core.protocol import TargetInfo


def run_with(deadline: float = 0.0) -> Run:
    job = GenerateJob("r1", "p", SamplingParams(), SpecParams(), session="s1", deadline=deadline)
    return Run(job, [1, 2, 3])


async def test_stop_reason_names_the_cancel_and_the_deadline():
    run = run_with(time.time() + 60)
    assert run.stop_reason() is None
    run.cancelled.set()
    assert run.stop_reason() == "cancelled"
    assert run_with(time.time() - 1).stop_reason() == "deadline_exceeded"
    assert run_with(0.0).stop_reason() is None  # 0 = no deadline


async def test_unless_stopped_returns_the_result_of_work_that_finishes():
    async def work():
        return 42

    assert await run_with(time.time() + 60).unless_stopped(work()) == 42
    assert await run_with(0.0).unless_stopped(work()) == 42


async def test_unless_stopped_abandons_work_at_the_deadline():
    abandoned = asyncio.Event()

    async def forever():
        try:
            await asyncio.Event().wait()
        finally:
            abandoned.set()

    deadline = time.time() + 0.3
    with pytest.raises(Stopped) as stop:
        await run_with(deadline).unless_stopped(forever())
    assert stop.value.code == "deadline_exceeded"
    assert 0 <= time.time() - deadline < 0.2
    assert abandoned.is_set()  # cancelled, not left running


async def test_unless_stopped_abandons_work_on_cancel():
    run = run_with(0.0)
    asyncio.get_running_loop().call_later(0.1, run.cancelled.set)
    t0 = time.monotonic()
    with pytest.raises(Stopped) as stop:
        await run.unless_stopped(asyncio.sleep(30))
    assert stop.value.code == "cancelled" and time.monotonic() - t0 < 1.0


def test_context_error_is_the_smaller_context_and_says_the_numbers():
    draft = SimpleNamespace(context_length=2048, name="d")
    target = TargetInfo("t", 10, (2,), 1024)
    assert context_error(1000, 24, draft, target) is None  # exactly full is allowed
    message = context_error(1000, 25, draft, target)
    assert message and "1000" in message and "25" in message and "1025" in message and "1024" in message
    assert "target t" in message
    assert context_error(1000, 1049, draft, None) is not None  # target not known yet: the draft's bound
    assert context_error(1000, 1048, draft, None) is None
    assert context_error(10**6, 1, None, None) is None  # nothing known: the run checks again later
