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


async def test_a_loser_that_swallows_the_cancel_is_cancelled_again():
    ended: list = []

    async def swallows_one_cancel():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # as asyncio.wait_for does in 3.11 when its inner result lands with the cancel
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(True)

    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(unless(_after(0.01, "work"), swallows_one_cancel()), 3) == (True, "work")
    assert asyncio.get_running_loop().time() - started < 1.0  # not the loser's 30 s sleep, nor the 3 s bound
    assert ended == [True]


async def test_a_verify_watch_whose_ping_reply_lands_with_the_cancel_does_not_stall_the_round():
    """The stall seen under 128 requests: the round's reply and the watch's ping reply arrive in the same loop
    iteration; the watch's `wait_for` returns the ping instead of raising the cancel, and pings on."""
    loop = asyncio.get_running_loop()
    ping = loop.create_future()
    started = loop.time()

    async def watch():
        while True:
            await asyncio.wait_for(ping, 30)
            await asyncio.sleep(30)  # the next ping

    async def round_trip():
        await asyncio.sleep(0.01)
        loop.call_soon(ping.set_result, "pong")  # the ping reply wakes the watch just before the cancel reaches it
        return "verdict"

    assert await asyncio.wait_for(unless(round_trip(), watch()), 3) == (True, "verdict")
    assert loop.time() - started < 1.0
