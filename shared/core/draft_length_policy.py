"""How many tokens to draft per round: the analytical optimum, and policies that re-choose it every round.

With per-token acceptance rate alpha, one round of gamma draft tokens yields (1 - alpha^(gamma+1)) / (1 - alpha)
tokens on average and costs c*gamma + b seconds: c per draft token (draft compute + its uplink bytes / rate),
b per round (verify + RTT + downlink). Against a baseline that makes one token per t_ref seconds the speedup is

    S(gamma) = (1 - alpha^(gamma+1)) / ((1 - alpha) * (c' gamma + B)),   c' = c / t_ref,  B = b / t_ref.

Setting dS/dgamma = 0 and substituting z = gamma + B/c', w = 1 - z ln(alpha) gives w e^(-w) = e^(-1 - ln(alpha)
(1 - B/c')), so gamma* = (1 - w)/ln(alpha) - B/c' with w = -W_{-1}(-e^(-1 - ln(alpha)(1 - B/c'))) on the lower
branch of the Lambert W function (w >= 1). Pure functions, no I/O: the engine, the services and `bench` all
call these.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Protocol

from draftwire.shared.core.params import POLICIES

ADAPTIVE_MAX_GAMMA = 16
_ALPHA_EPS = 1e-6


def expected_tokens(alpha: float, gamma: float) -> float:
    """Mean tokens a round emits: accepted drafts plus the target's one token."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup(alpha: float, gamma: float, c_rel: float, b_rel: float) -> float:
    """S(gamma), with c' and B relative to the baseline's time per token."""
    return expected_tokens(alpha, gamma) / (c_rel * gamma + b_rel)


def lambert_w_lower(x: float) -> float:
    """W_{-1}(x) for x in [-1/e, 0): the solution w <= -1 of w e^w = x (Halley's iteration)."""
    if not -1.0 / math.e <= x < 0.0:
        raise ValueError(f"W_-1 is defined on [-1/e, 0), got {x}")
    if x + 1.0 / math.e < 1e-15:
        return -1.0
    # start near the branch point with its series, elsewhere with the asymptotic form
    if x < -0.25:
        w = -1.0 - math.sqrt(2.0 * (1.0 + math.e * x))
    else:
        lx = math.log(-x)
        w = lx - math.log(-lx)
    for _ in range(64):
        ew = math.exp(w)
        f = w * ew - x
        step = f / (ew * (w + 1.0) - (w + 2.0) * f / (2.0 * w + 2.0))
        w -= step
        if abs(step) <= 1e-15 * (1.0 + abs(w)):
            break
    return w


def optimal_gamma_real(alpha: float, c: float, b: float) -> float:
    """The real-valued maximiser of S (any unit for c and b: only their ratio matters); inf if S keeps rising."""
    if c <= 0:
        return math.inf
    alpha = min(max(alpha, _ALPHA_EPS), 1.0 - _ALPHA_EPS)
    log_a = math.log(alpha)
    ratio = b / c
    arg = -math.exp(-1.0 - log_a * (1.0 - ratio))
    if arg < -1.0 / math.e:  # b < c: no interior maximum on z > 0, S falls from gamma = 0 on
        return 0.0
    w = -lambert_w_lower(arg)
    return max((1.0 - w) / log_a - ratio, 0.0)


def optimal_gamma(alpha: float, c: float, b: float, max_gamma: int = ADAPTIVE_MAX_GAMMA) -> int:
    """The best integer draft length in [1, max_gamma]: the closed form's two neighbours, whichever is better."""
    g = optimal_gamma_real(alpha, c, b)
    if math.isinf(g):
        return max_gamma
    candidates = {min(max(math.floor(g), 1), max_gamma), min(max(math.ceil(g), 1), max_gamma)}
    c_rel, b_rel = max(c, 1e-12), max(b, 1e-12)
    return max(sorted(candidates), key=lambda n: speedup(alpha, n, c_rel, b_rel))


# --- online estimation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundObservation:
    """What one finished round tells the policy (all measured on the device)."""

    drafted: int
    accepted: int
    draft_s: float  # draft compute for the round
    round_s: float  # from the start of drafting to the verdict applied
    uplink_bytes: int
    # The round also (re)built a KV cache from the whole history: a session's first round (the prompt's
    # prefill on both sides) or a resync. Its times are one-off costs, not per-round or per-token ones.
    prefill: bool = False
    # The edge's load, from the verdict: sessions that shared the forward pass, and what one more verified
    # token costs that pass (batch_cost). 1 and 0 for a verifier that serves one session at a time.
    batch: int = 1
    verify_token_s: float = 0.0


@dataclass
class CostModel:
    """Running estimates of alpha, c and b from finished rounds, exponentially forgetting old ones.

    alpha is the censored-geometric estimate accepted / (accepted + rejections). Prefill rounds count for
    alpha but not for the costs (see RoundObservation.prefill). The time a round spends
    outside draft compute, round_s - draft_s, is regressed on the number of drafted tokens (recursive least
    squares with forgetting): the slope is what each draft token adds on the way (its uplink bytes at the link's
    rate, its share of the verify forward), the intercept the fixed per-round cost b (RTT, downlink, the rest
    of verification). So the link is learnt from the traffic itself, in any mode; `wait_per_token` seeds the
    slope until rounds of different lengths have been seen.
    """

    decay: float = 0.9
    alpha_prior: float = 0.7
    prior_weight: float = 2.0
    wait_per_token: float = 0.0
    rounds: int = 0
    timed_rounds: int = 0  # rounds whose times fed the costs (not prefill rounds)
    _acc: float = 0.0
    _tests: float = 0.0
    _draft_per_token: float | None = None
    _fixed: float | None = None
    _shared_token: float = 0.0  # what one more drafted token costs the OTHER sessions of the last round's batch
    # least-squares sufficient statistics of wait = b + slope * drafted
    _s: list[float] = field(default_factory=lambda: [0.0] * 5)

    @property
    def rounds_seen(self) -> bool:
        return self._fixed is not None

    @property
    def alpha(self) -> float:
        return (self._acc + self.alpha_prior * self.prior_weight) / (self._tests + self.prior_weight)

    def observe(self, r: RoundObservation) -> None:
        self.rounds += 1
        d = self.decay
        rejected = 1 if r.accepted < r.drafted else 0
        self._acc = d * self._acc + r.accepted
        self._tests = d * self._tests + r.accepted + rejected
        if r.prefill:
            # Counting the prompt's prefill as round cost inflates whichever of slope and intercept the first
            # round's length happens to load it on: a first round of gamma 4 with the prefill's extra wait,
            # then the gamma/2 probe, reads as a dearer draft token, and the policy under-drafted
            # (docs/bench/qwen-gamma-before-prefill-fix: mean gamma 3.4 where fixed gamma 6 was faster).
            return
        self.timed_rounds += 1
        # the load NOW (the batch this round was verified in), not an average: a lone session after a burst
        # must not keep drafting short for the sessions that have left
        self._shared_token = r.verify_token_s * max(r.batch - 1, 0)
        if r.drafted:
            self._draft_per_token = _ewma(self._draft_per_token, r.draft_s / r.drafted, 1 - d)
        wait = max(r.round_s - r.draft_s, 0.0)
        x = float(r.drafted)
        s = self._s
        for i, v in enumerate((1.0, x, x * x, wait, x * wait)):
            s[i] = d * s[i] + v
        n, sx, sxx, sy, sxy = s
        det = n * sxx - sx * sx
        if det > 1e-6 * n * sxx:  # draft lengths varied enough to separate the slope from the intercept
            self.wait_per_token = max((n * sxy - sx * sy) / det, 0.0)
        self._fixed = max((sy - self.wait_per_token * sx) / n, 0.0)

    def costs(self) -> tuple[float, float]:
        """(c, b) in seconds: per draft token and per round.

        Load-aware: at a batched edge, a verified token also delays every other session in the forward pass
        by the edge's marginal token cost, so c carries that too (as vLLM shortens speculation as its batch
        grows). Alone on the edge (batch 1) it adds nothing and the single-session optimum is unchanged.
        """
        c = (self._draft_per_token or 0.0) + self.wait_per_token + self._shared_token
        return c, self._fixed or 0.0


def _ewma(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new


# --- policies -----------------------------------------------------------------------------------------


class DraftLengthPolicy(Protocol):
    """Chooses each round's gamma and learns from the round's outcome (one instance per session)."""

    def next_gamma(self) -> int: ...

    def observe(self, r: RoundObservation) -> None: ...


@dataclass
class FixedGamma:
    gamma: int

    def next_gamma(self) -> int:
        return self.gamma

    def observe(self, r: RoundObservation) -> None:
        pass


@dataclass
class AdaptiveGamma:
    """gamma* re-chosen every round from the session's running alpha, c and b (starting at `gamma`)."""

    gamma: int
    max_gamma: int = ADAPTIVE_MAX_GAMMA
    model: CostModel = field(default_factory=CostModel)

    probe_every: int = 8

    def next_gamma(self) -> int:
        # Rounds of one length cannot tell per-token from per-round cost: the first two timed rounds (after
        # the prefill round) try gamma and gamma/2, and every `probe_every` rounds one round tries a neighbour
        # of the current optimum.
        n = self.model.timed_rounds
        if n < 2:
            return self.gamma if n == 0 else max(1, self.gamma // 2)
        c, b = self.model.costs()
        best = self.gamma if c <= 0 and b <= 0 else optimal_gamma(self.model.alpha, c, b, self.max_gamma)
        if n % self.probe_every == 0:
            return best + 1 if best < self.max_gamma else best - 1
        return best

    def observe(self, r: RoundObservation) -> None:
        self.model.observe(r)


def load_band(sessions: int) -> int:
    """Bands of concurrent sessions whose costs are alike: 1, 2-3, 4-7, 8-15, ... (powers of two)."""
    return max(sessions, 1).bit_length()


@dataclass
class WarmStarts:
    """What finished sessions learnt, for the next session to start from, kept per load band.

    A round's costs depend on how many sessions share the draft and the edge: a session that ran in a burst
    learnt slower draft steps and longer waits. Handed to a session that then runs alone, that made it draft
    short for rounds on end (16-session bursts, then one request: 17.4 tok/s before the first burst, 12.8-13.9
    after the others, docs/bench/batching/loadtest-packed-final). So a session stores what it learnt under the
    load it mostly ran at, and a new one starts from the band of the load it starts at (the nearest band with
    anything, else from scratch)."""

    by_band: dict[tuple, CostModel] = field(default_factory=dict)  # (key, band) -> the latest session's model

    def get(self, key: tuple, sessions: int) -> CostModel | None:
        band = load_band(sessions)
        held = [b for k, b in self.by_band if k == key]
        if not held:
            return None
        return self.by_band[(key, min(held, key=lambda b: (abs(b - band), b)))]

    def put(self, key: tuple, loads: list[int], model: CostModel) -> None:
        """`loads`: the sessions running at each of its rounds (none: it learnt nothing to keep)."""
        if loads:
            self.by_band[(key, load_band(sorted(loads)[len(loads) // 2]))] = model


def make_policy(name: str, gamma: int, warm: CostModel | None = None) -> DraftLengthPolicy:
    """`confidence` drafts up to gamma and lets the session stop early (see DraftSession); it is fixed here.

    `warm` (adaptive) starts the session from what earlier sessions learnt (a copy: alpha, costs, the link),
    instead of from scratch; short generations otherwise spend most of their rounds estimating.
    """
    if name == "adaptive":
        model = copy.deepcopy(warm) if warm is not None else CostModel()
        return AdaptiveGamma(gamma, max(gamma, ADAPTIVE_MAX_GAMMA), model)
    if name in ("fixed", "confidence"):
        return FixedGamma(gamma)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
