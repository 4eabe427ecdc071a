"""Await one piece of work unless a guard finishes first: the one race the services run.

A draft abandons a model step or a wait when its request is cancelled or its deadline passes; a device
abandons a verify request when the verifier it addressed dies. Both are "await `work` unless `guard` ends
first", and both must cancel (and reap) the loser so nothing keeps running for a request that is over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any


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
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fut
