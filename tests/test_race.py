"""`draftwire.shared.core.race.unless`: the winner's result, the loser cancelled, exceptions re-raised."""

import asyncio

import pytest

from draftwire.shared.core.race import unless


async def _after(seconds: float, value, cancelled: list | None = None):
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if cancelled is not None:
            cancelled.append(value)
        raise
    if isinstance(value, Exception):
        raise value
    return value


async def test_work_first_wins_and_the_guard_is_cancelled():
    cancelled: list = []
    assert await unless(_after(0.01, "work"), _after(5, "guard", cancelled)) == (True, "work")
    assert cancelled == ["guard"]


async def test_guard_first_wins_and_the_work_is_cancelled():
    cancelled: list = []
    assert await unless(_after(5, "work", cancelled), _after(0.01, "guard")) == (False, "guard")
    assert cancelled == ["work"]


async def test_the_winner_s_exception_is_re_raised():
    with pytest.raises(KeyError):
        await unless(_after(0.01, KeyError("w")), _after(5, "guard"))
    with pytest.raises(ValueError):
        await unless(_after(5, "work"), _after(0.01, ValueError("g")))
