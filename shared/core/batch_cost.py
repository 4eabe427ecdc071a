"""What one more verified token costs the edge at its present load: the slope of forward time vs tokens.

A forward pass over N tokens takes about t0 + m*N seconds: t0 reads the weights (the whole cost at a single
session's few tokens, where the CPU or GPU is memory-bound), m is the compute each extra token adds once the
batch is big enough to be compute-bound. Continuous batching runs forwards of many sizes, so a least-squares
line over recent (tokens, seconds) pairs separates the two. The verifier sends m and its batch size in every
verdict; a device's draft-length policy charges each drafted token m for every session sharing the forward
(vLLM shrinks its speculation length as the batch grows for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ForwardCost:
    """Forward seconds regressed on tokens fed, forgetting old passes exponentially."""

    decay: float = 0.95
    _s: list[float] = field(default_factory=lambda: [0.0] * 5)  # n, sum x, sum x^2, sum y, sum x*y
    slope: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        x, y = float(tokens), float(seconds)
        for i, v in enumerate((1.0, x, x * x, y, x * y)):
            self._s[i] = self.decay * self._s[i] + v
        n, sx, sxx, sy, sxy = self._s
        det = n * sxx - sx * sx
        if det > 1e-3 * n * sxx:  # batch sizes varied enough to tell per-token from per-pass cost
            self.slope = max((n * sxy - sx * sy) / det, 0.0)

    def per_token(self) -> float:
        """m in seconds per token; before sizes varied, the mean cost per token (an upper bound on m)."""
        if self.slope is not None:
            return self.slope
        _, sx, _, sy, _ = self._s
        return sy / sx if sx > 0 else 0.0
