"""Placement: which instance takes the next session, from the loads the instances report.

Every draft and verifier instance reports its load in the `data` of its nats.micro `$SRV.STATS` reply
(`draftwire.shared.io.service_shell.register`, gathered by `draftwire.shared.io.loads`). Here a report becomes a comparable `Load`
and the least-loaded instance is chosen: one with room first, then one whose load is unknown (an older
instance that reports none), and only when every instance is full the least-loaded full one, since a job has
to go somewhere and a full draft or verifier queues it rather than losing it. Ties are broken at random, so
equal instances share a burst. Sessions placed since the report was read are added by the caller
(`placed`), so a burst does not all land on the instance that was idle when the loads were read. An instance
that reports `draining` (`draftwire.shared.core.drain`) is never chosen, not even when it is the only one.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """One instance's load: `key` orders instances (lower is less loaded); None means it reported none.
    `draining`: it takes no new session (it is being drained for maintenance)."""

    instance: str
    key: tuple[float, ...] | None = None
    full: bool = False
    draining: bool = False


def _count(data: object, name: str) -> int | None:
    value = data.get(name) if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def is_draining(data: object) -> bool:
    """Whether a reported load says the instance is draining (`"draining": true`)."""
    return isinstance(data, dict) and data.get("draining") is True


def draft_load(instance: str, data: object, placed: int = 0) -> Load:
    """A draft reports `{"active": sessions it holds, "max": its --max-concurrent}`: the busier fraction of
    its slots is the more loaded (a draft with more slots takes more), then the more sessions."""
    active, most = _count(data, "active"), _count(data, "max")
    if active is None or not most:
        return Load(instance, draining=is_draining(data))
    active += placed
    return Load(instance, (active / most, float(active)), full=active >= most, draining=is_draining(data))


def verifier_load(instance: str, data: object, placed: int = 0) -> Load:
    """A verifier reports `{"sessions", "queue", "busy", "max_queue"}`. Every session it holds adds rows to
    each forward pass, so sessions order first; the rounds waiting now break ties. Full: its queue refuses
    rounds `busy` (`busy` itself counts refusals since start, not a present state)."""
    sessions, queue = _count(data, "sessions"), _count(data, "queue")
    if sessions is None or queue is None:
        return Load(instance, draining=is_draining(data))
    max_queue = _count(data, "max_queue")
    return Load(instance, (float(sessions + placed), float(queue)),
                full=max_queue is not None and queue >= max_queue, draining=is_draining(data))


def least_loaded(loads: Iterable[Load], rng: random.Random, exclude: Collection[str] = ()) -> Load | None:
    """The least-loaded instance not in `exclude` nor draining: one with room, else of unknown load, else a
    full one."""
    pool = [load for load in loads if load.instance not in exclude and not load.draining]
    tiers = (
        [load for load in pool if load.key is not None and not load.full],
        [load for load in pool if load.key is None],
        [load for load in pool if load.key is not None and load.full],
    )
    for tier in tiers:
        if tier:
            best = min(tier, key=lambda load: load.key or ()).key  # the unknown tier: None, all tie
            ties = sorted((load for load in tier if load.key == best), key=lambda load: load.instance)
            return rng.choice(ties)
    return None


__all__ = ["Load", "draft_load", "is_draining", "least_loaded", "verifier_load"]
