"""Per-request generation parameters, validated once at the edge of the system.

The CLI, the in-process engine and every NATS service build a `SamplingParams` the same way, so a bad
temperature or top-p is rejected with the same message wherever it enters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

MODES = ("ar", "full", "tkslt", "dssd")
POLICIES = ("fixed", "adaptive", "confidence")
QUANTS = ("f16", "u8", "f32")

# The one place for defaults: SpecParams, SamplingParams, the CLI and the scheduler's flags all read these.
DEFAULT_MODE = "tkslt"
DEFAULT_GAMMA = 4
DEFAULT_K = 8
DEFAULT_QUANT = "f16"
DEFAULT_POLICY = "fixed"
DEFAULT_CONFIDENCE = 0.5
DEFAULT_MAX_NEW_TOKENS = 128


class ParamError(ValueError):
    """A request parameter is out of range; the message names the parameter and the bad value."""


@dataclass(frozen=True)
class SamplingParams:
    """What shapes the target distribution p (and so the draft's q): identical on device and edge."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def __post_init__(self) -> None:
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ParamError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise ParamError(f"top_p must be in (0, 1], got {p!r}")
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_int("max_new_tokens", self.max_new_tokens, 1, 1 << 20)
        _check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpecParams:
    """How the speculation is run: mode, draft length gamma, sparsity K and the wire quantization.

    `dssd` (split verification) sends only the draft tokens and their own probabilities uplink; K and quant
    do not apply to it.
    """

    mode: str = DEFAULT_MODE
    gamma: int = DEFAULT_GAMMA  # fixed: every round; adaptive: the first round; confidence: the most per round
    k: int = DEFAULT_K
    quant: str = DEFAULT_QUANT
    policy: str = DEFAULT_POLICY  # how gamma is chosen each round, see shared.core.draft_length_policy
    confidence: float = DEFAULT_CONFIDENCE  # policy `confidence`: stop drafting when the draft's top probability is below
    pipeline: bool = False  # keep drafting while a verify request is in flight (PEARL)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParamError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        _check_int("gamma", self.gamma, 1, 64)
        _check_int("k", self.k, 1, 1 << 24)
        if self.quant not in QUANTS:
            raise ParamError(f"quant must be one of {', '.join(QUANTS)}; got {self.quant!r}")
        if self.policy not in POLICIES:
            raise ParamError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c <= 1:
            raise ParamError(f"confidence must be a number in [0, 1], got {c!r}")
        if not isinstance(self.pipeline, bool):
            raise ParamError(f"pipeline must be true or false, got {self.pipeline!r}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ParamError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
