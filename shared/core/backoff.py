"""Retry delays with exponential growth and full jitter: the one backoff every retry loop in draftwire uses.

Pure (the random source is passed in), so tests can pin it. Full jitter (a uniform draw in [0, d]) keeps many
devices that lost the same verifier, or many schedulers waiting for a draft instance, from retrying in
lock-step (AWS architecture blog, "Exponential Backoff and Jitter"). A caller writes:

    backoff = Backoff(initial=0.1, cap=2.0)
    while not done():
        await asyncio.sleep(backoff.next())
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.1
    cap: float = 2.0
    factor: float = 2.0
    jitter: bool = True
    rng: random.Random = field(default_factory=random.Random)
    _ceiling: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.cap >= self.initial and self.factor >= 1):
            raise ValueError(
                f"backoff needs initial > 0, cap >= initial and factor >= 1; got {self.initial}, {self.cap}, "
                f"{self.factor}"
            )
        self.reset()

    def reset(self) -> None:
        self._ceiling = self.initial

    def next(self) -> float:
        """The delay before the next attempt; the ceiling grows by `factor` up to `cap`."""
        ceiling = self._ceiling
        self._ceiling = min(self._ceiling * self.factor, self.cap)
        return self.rng.uniform(ceiling / 2, ceiling) if self.jitter else ceiling
