"""Await one piece of work unless a guard finishes first: the one race the services run.

A draft abandons a model step or a wait when its request is cancelled or its deadline passes; a device
abandons a verify request when the verifier it addressed dies. Both are "await `work` unless `guard` ends
first", and both must cancel (and reap) the loser so nothing keeps running for a request that is over.

A cancel can be swallowed on the way: Python 3.11's `asyncio.wait_for` (inside nats-py's `request`) returns
the inner result when it completes together with the cancel, so a verify round's liveness watch, cancelled
while its ping reply arrived, went on pinging, and awaiting it stalled the session until its deadline (seen
under 128 concurrent requests: 1 to 4 sessions each run). The loser is therefore cancelled again until it
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

RECANCEL_S = 0.05  # how long a cancelled loser may take to end before it is cancelled again


async def unless(work: Awaitable[Any], guard: Awaitable[Any]) -> tuple[bool, Any]:
    """(True, work's result) if `work` finished first (or together with `guard`), else (False, guard's result).

    Either result re-raises what its awaitable raised; the other one is cancelled and awaited.
    """
    w, g = asyncio.ensure_future(work), asyncio.ensure_future(guard)
    try:
        await asyncio.wait({w, g}, return_when=asyncio.FIRST_COMPLETED)
        return (True, w.result()) if w.done() else (False, g.result())
    finally:
        for fut in (w, g):
            while not fut.done():  # again after a swallowed cancel: it lands at the loser's next await
                fut.cancel()
                await asyncio.wait({fut}, timeout=RECANCEL_S)
            if not fut.cancelled():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    fut.result()  # the loser's own outcome is not this call's; retrieved, so never logged
