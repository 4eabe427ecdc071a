"""The instances of a micro service and their loads, read from nats.micro's `$SRV.STATS.<service>`.

One request, many replies: every instance answers on our inbox, and its reply names it (`metadata.instance`,
set by `draftwire.shared.io.service_shell.register`), gives its micro service id (for `$SRV.PING.<service>.<id>`), and
carries the load it reports in each endpoint's `data` (None from an instance that reports none). A
`LoadBoard` keeps the last gathering for a short while and counts the sessions placed on each instance since,
so a burst of placements costs one gathering and still spreads (`draftwire.shared.core.placement`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client

from draftwire.shared.core.placement import Load, least_loaded
from draftwire.shared.core.subject_names import validate_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reported:
    """One instance's stats reply: its name, its micro service id, and the load data it reports (or None)."""

    instance: str
    service_id: str
    data: dict | None = None


def parse_stats(raw: bytes) -> Reported | None:
    """A `$SRV.STATS` reply as a `Reported`; None for one without a valid instance name and id."""
    try:
        stats = json.loads(raw)
        instance = validate_token(stats["metadata"]["instance"], "instance")
        service_id = validate_token(str(stats["id"]), "service id")
        endpoints = stats.get("endpoints") or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    loads = (e.get("data") for e in endpoints if isinstance(e, dict))
    data = next((d for d in loads if isinstance(d, dict)), None)
    return Reported(instance, service_id, data)


async def gather_stats(
    nc: Client, service: str, *, window: float, quiet: float, expect: Collection[str] = ()
) -> dict[str, Reported]:
    """instance -> its stats reply, for every instance of `service` that answers in time.

    Waits up to `window` for the first reply, or for every instance in `expect` (those seen last time) to
    answer; then stops once `quiet` passes without another. "No responders" (nobody runs the service) ends it
    at once. Raises the client's errors (a closed connection).
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: dict[str, Reported] = {}
    deadline = time.monotonic() + window
    try:
        await nc.publish(f"$SRV.STATS.{service}", b"", reply=inbox)
        while True:
            done = bool(found) and set(expect) <= set(found)
            wait = quiet if done else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                break
            if (msg.headers or {}).get("Status") == "503":  # no responders
                break
            if (reported := parse_stats(msg.data)) is not None:
                found[reported.instance] = reported
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


class LoadBoard:
    """The loads of one service's instances, at most `ttl` old when asked, plus the sessions placed since.

    `to_load(instance, data, placed)` turns a reported load into a `Load` (`draftwire.shared.core.placement`). A
    failed gathering counts as none: placement then falls back to whatever the caller does without it.
    """

    def __init__(self, nc: Client, service: str, to_load: Callable[[str, object, int], Load], *,
                 ttl: float = 0.5, window: float = 0.1, quiet: float = 0.02,
                 rng: random.Random | None = None) -> None:
        self.nc, self.service, self.to_load = nc, service, to_load
        self.ttl, self.window, self.quiet = ttl, window, quiet
        self.rng = rng or random.Random()
        self.reported: dict[str, Reported] = {}
        self.placements: Counter[str] = Counter()
        self.refreshed = float("-inf")  # monotonic
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Gather again; while one gathering runs, other callers wait for it instead of starting their own."""
        if self._lock.locked():
            async with self._lock:
                return
        async with self._lock:
            try:
                self.reported = await gather_stats(self.nc, self.service, window=self.window,
                                                   quiet=self.quiet, expect=set(self.reported))
            except Exception as exc:  # noqa: BLE001 - disconnected: no loads, the caller's fallback applies
                log.debug("gathering $SRV.STATS.%s failed: %r", self.service, exc)
                self.reported = {}
            self.placements.clear()
            self.refreshed = time.monotonic()

    def stale(self) -> bool:
        return time.monotonic() - self.refreshed > self.ttl

    def loads(self) -> list[Load]:
        return [self.to_load(r.instance, r.data, self.placements[r.instance]) for r in self.reported.values()]

    async def choose(self, exclude: Collection[str] = ()) -> Load | None:
        """The least-loaded instance (refreshed first when stale); None when no instance answered."""
        if self.stale():
            await self.refresh()
        return least_loaded(self.loads(), self.rng, exclude)

    def placed(self, instance: str) -> None:
        """A session went to `instance`: it counts towards its load until the next gathering."""
        self.placements[instance] += 1

    def forget(self, instance: str) -> None:
        """`instance` is gone (no responders on its own subject): not chosen again until it answers again."""
        self.reported.pop(instance, None)


__all__ = ["LoadBoard", "Reported", "gather_stats", "parse_stats"]
