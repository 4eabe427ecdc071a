"""Telemetry events: their validation, the token clock that stamps them, and a rolling window over them.

Pure: no I/O and no clock. Every call that depends on time takes `now` (seconds, same clock for all calls),
so the telemetry service passes time.time() and tests pass hand-picked instants.

The window gives what `/stats` serves: gauges over the last `window_s` seconds (acceptance rate, tokens/s,
bytes per token, round-time breakdown and percentiles), per mode and per draft / verifier instance, plus
"all", and totals since start. The Prometheus metrics are `draftwire.shared.core.telemetry_metrics`.

Events are windowed by arrival time (`now` at `add`), not by the producer's `ts`: a device with a skewed clock
must neither hide its events nor pin them in the window forever.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

DEFAULT_WINDOW_S = 300.0
DEFAULT_MAX_EVENTS = 10_000  # per series and kind: bounds memory under a flood, whatever the window
DEFAULT_MAX_SERIES = 256  # distinct names per role (mode / draft / verifier) before folding into OVERFLOW
MAX_EVENT_BYTES = 64 * 1024
MAX_NAME = 256
MAX_VERIFIERS = 64
MAX_ERROR_CODES = 64
OVERFLOW = "_other"  # label value that absorbs names beyond the series cap, so cardinality stays bounded
ROLES = ("mode", "draft", "verifier")
QUANTILES = (0.5, 0.99)


# Per-field bounds. A value outside them is a bug or a forgery, never a measurement, and one such value in
# the totals would spoil every rate Prometheus takes from them; so the whole event is refused.
MAX_TOKENS = 1 << 31  # token counts, round numbers, gamma, k: far beyond max_new_tokens (2^20), k (2^24)
MAX_BYTES = 1 << 40  # bytes of one round or request: 1 TiB, where one message is 8 MiB at most
MAX_DURATION_S = 7 * 24 * 3600.0  # seconds of one round or request: a week (requests default to 600 s)
MAX_RATE = float(1 << 31)  # tokens per second
MAX_TS = float(1 << 33)  # unix seconds: the year 2242 (a clock beyond that is broken)


class EventError(ValueError):
    """An event that cannot be counted; the message says which field is wrong and why."""


# --- validation ---------------------------------------------------------------------------------------------

Checker = Callable[[Any], Any]  # returns the normalized value or raises TypeError/ValueError(what it must be)


def _id(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError("a non-empty string")
    if len(v) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("a string")
    if len(v) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters")
    return v


def _names(v: Any) -> list[str]:
    if not isinstance(v, list | tuple) or len(v) > MAX_VERIFIERS:
        raise TypeError(f"a list of at most {MAX_VERIFIERS} strings")
    return [_name(x) for x in v]


def _count_below(limit: int, shown: str) -> Checker:
    """An integer in [0, limit); bools (an int subclass) and integral floats are refused."""

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit:
            raise TypeError(f"a non-negative integer below {shown}")
        return v

    return check


def _number_upto(limit: float, shown: str) -> Checker:
    """A number in [0, limit]: refuses NaN and the infinities too (every comparison with NaN is false)."""

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= limit:
            raise TypeError(f"a finite non-negative number at most {shown}")
        return float(v)

    return check


_tokens = _count_below(MAX_TOKENS, "2^31")
_bytes = _count_below(MAX_BYTES, "2^40")
_seconds = _number_upto(MAX_DURATION_S, f"{MAX_DURATION_S:g}")
_rate = _number_upto(MAX_RATE, "2^31")
_fraction = _number_upto(1.0, "1")
_ts = _number_upto(MAX_TS, "2^33")


def _opt_text(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > 4096:
        raise TypeError("null or a string of at most 4096 characters")
    return v


ROUND_SCHEMA: dict[str, Checker] = {
    "request_id": _id, "mode": _id, "draft_instance": _name, "verifier_instance": _name,
    "round": _tokens, "drafted": _tokens, "accepted": _tokens, "emitted": _tokens,
    "uplink_bytes": _bytes, "downlink_bytes": _bytes,
    "draft_s": _seconds, "verify_s": _seconds, "round_s": _seconds, "gamma": _tokens, "ts": _ts,
}  # fmt: skip
REQUEST_SCHEMA: dict[str, Checker] = {
    "request_id": _id, "mode": _id, "gamma": _tokens, "k": _tokens,
    "draft_instance": _name, "verifier_instances": _names,
    "new_tokens": _tokens, "wall_s": _seconds, "tokens_per_s": _rate, "acceptance_rate": _fraction,
    "uplink_bytes": _bytes, "downlink_bytes": _bytes, "finish_reason": _opt_text, "error": _opt_text,
    "ts": _ts,
}  # fmt: skip
SCHEMAS = {"round": ROUND_SCHEMA, "request": REQUEST_SCHEMA}
# Only on rounds that commit tokens (see TokenClock): the run's first such round has ttft_s, later ones itl_s.
OPTIONAL: dict[str, dict[str, Checker]] = {"round": {"ttft_s": _seconds, "itl_s": _seconds}}
# A request the scheduler refused before any draft saw it (`"rejected": true` on a request event): no mode, no
# draft, perhaps no id yet (a payload that does not parse). validate_event returns it as type "rejected".
REJECTED_SCHEMA: dict[str, Checker] = {"request_id": _name, "error": _id, "ts": _ts}


def validate_event(obj: Any, expect_type: str | None = None) -> dict:
    """Check a decoded event against its schema and return only the known fields, normalized.

    Unknown extra keys are ignored so producers can add fields before telemetry knows them. `expect_type`
    rejects e.g. a round event published on the request subject. Whatever `obj` is, the only exception is
    EventError. Besides each field's bounds, a round emits at most its accepted tokens plus the target's one,
    and only a round that emitted tokens has a token latency (ttft_s or itl_s, not both). A request event with
    `"rejected": true` comes back as type "rejected" with REJECTED_SCHEMA's fields.
    """
    if not isinstance(obj, Mapping):
        raise EventError(f"event must be a map, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:  # a list or map `type` is not even hashable
        raise EventError(f"event 'type' must be one of {sorted(SCHEMAS)}, got {_short(kind)}")
    if expect_type is not None and kind != expect_type:
        raise EventError(f"{kind} event on the {expect_type} subject")
    rejected = obj.get("rejected", False)
    if rejected is not False and not (rejected is True and kind == "request"):
        raise EventError(f"{kind} event: field 'rejected' must be absent, false, or true on a request event")
    schema = REJECTED_SCHEMA if rejected else SCHEMAS[kind]
    if missing := [k for k in schema if k not in obj]:
        raise EventError(f"{kind} event: missing field(s) {', '.join(missing)}")
    out: dict[str, Any] = {"type": "rejected" if rejected else kind}
    optional = {} if rejected else OPTIONAL.get(kind, {})
    for key, check in [*schema.items(), *((k, c) for k, c in optional.items() if obj.get(k) is not None)]:
        try:
            out[key] = check(obj[key])
        except (TypeError, ValueError) as exc:
            raise EventError(f"{kind} event: field {key!r} must be {exc}, got {_short(obj[key])}") from None
    if out["type"] == "round":
        if out["accepted"] > out["drafted"]:
            raise EventError(f"round event: accepted ({out['accepted']}) > drafted ({out['drafted']})")
        if out["emitted"] > out["accepted"] + 1:
            raise EventError(
                f"round event: emitted ({out['emitted']}) > accepted + 1 ({out['accepted'] + 1})"
            )
        latencies = [k for k in optional if k in out]
        if len(latencies) > 1 or (latencies and out["emitted"] == 0):
            raise EventError(f"round event: {' and '.join(latencies)} on a round that emitted "
                             f"{out['emitted']} tokens (one of them, on a round that emitted some)")
    return out


def decode_event(data: bytes, expect_type: str | None = None) -> dict:
    """msgpack bytes -> validated event; any decoding failure becomes an EventError."""
    if len(data) > MAX_EVENT_BYTES:
        raise EventError(f"event is {len(data)} bytes, more than {MAX_EVENT_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises a zoo (ExtraData, FormatError, UnicodeDecodeError)
        raise EventError(f"not a msgpack map: {type(exc).__name__}: {exc}") from None
    return validate_event(obj, expect_type)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def error_code(error: str) -> str:
    """The machine-readable code of a request's `error` ("timeout", "no_session: ..."); "other" if none.

    Only the text before the first ':' counts, so free-form messages cannot explode label cardinality.
    """
    head = error.split(":", 1)[0].strip()
    return head if _CODE.fullmatch(head) else "other"


# --- producing: the token clock -----------------------------------------------------------------------


class TokenClock:
    """Time to first token, then inter-token latency, as vLLM v1 counts them: per round that commits tokens.

    The draft stamps its round events with `lap`'s result: `ttft_s` on the run's first round that commits
    tokens (from when the draft accepted the job), `itl_s` on every later one (since the previous one). Both
    from the draft's own monotonic clock, so telemetry keeps no per-request state and needs no agreement
    between hosts' clocks. A run that resumes a session (failover) has no first token: its laps are all itl_s.
    """

    def __init__(self, start: float, resumed: bool = False) -> None:
        self._last = start
        self._key = "itl_s" if resumed else "ttft_s"

    def lap(self, now: float, committed: int) -> dict[str, float]:
        if committed <= 0:
            return {}
        out = {self._key: max(0.0, now - self._last)}
        self._last, self._key = now, "itl_s"
        return out


# --- aggregation ----------------------------------------------------------------------------------------------


class _Round(NamedTuple):
    t: float
    drafted: int
    accepted: int
    emitted: int
    up: int
    down: int
    draft_s: float
    verify_s: float
    round_s: float


class _Request(NamedTuple):
    t: float
    new_tokens: int
    wall_s: float
    error: str | None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rounds: Sequence[_Round], requests: Sequence[_Request]) -> dict:
    """Window statistics of one series; ratios are None (JSON null) when their denominator is zero."""
    drafted = sum(r.drafted for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    emitted = sum(r.emitted for r in rounds)
    round_s = [r.round_s for r in rounds]
    new_tokens = sum(r.new_tokens for r in requests)
    errors = Counter(r.error for r in requests if r.error is not None)
    out = {
        "rounds": len(rounds),
        "requests": len(requests),
        "drafted": drafted,
        "accepted": accepted,
        "emitted": emitted,
        "new_tokens": new_tokens,
        "acceptance_rate": _ratio(accepted, drafted),
        "tokens_per_s": _ratio(new_tokens, sum(r.wall_s for r in requests)),
        "round_tokens_per_s": _ratio(emitted, sum(round_s)),
        "uplink_bytes_per_token": _ratio(sum(r.up for r in rounds), emitted),
        "downlink_bytes_per_token": _ratio(sum(r.down for r in rounds), emitted),
        "mean_draft_s": _mean([r.draft_s for r in rounds]),
        "mean_verify_s": _mean([r.verify_s for r in rounds]),
        # what the device waited for beyond both computes: transport, (de)serialization and queueing
        "mean_network_s": _mean([max(0.0, r.round_s - r.draft_s - r.verify_s) for r in rounds]),
        "errors": dict(sorted(errors.items())),
    }
    for q in QUANTILES:
        out[f"p{_qname(q)}_round_s"] = percentile(round_s, q)
    return out


def _qname(q: float) -> str:
    return f"{q * 100:g}".replace(".", "_")


@dataclass
class Totals:
    """Counters since start: they only grow, so Prometheus can take rates and detect restarts."""

    rounds: int = 0
    requests: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    new_tokens: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    round_s: float = 0.0
    wall_s: float = 0.0
    errors: Counter = field(default_factory=Counter)

    def add_round(self, r: _Round) -> None:
        self.rounds += 1
        self.drafted += r.drafted
        self.accepted += r.accepted
        self.emitted += r.emitted
        self.uplink_bytes += r.up
        self.downlink_bytes += r.down
        self.draft_s += r.draft_s
        self.verify_s += r.verify_s
        self.round_s += r.round_s

    def add_request(self, r: _Request) -> None:
        self.requests += 1
        self.new_tokens += r.new_tokens
        self.wall_s += r.wall_s
        if r.error is not None:
            self.errors[r.error] += 1

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "errors"}
        d["errors"] = dict(sorted(self.errors.items()))
        return d


class _Series:
    def __init__(self, max_events: int) -> None:
        self.rounds: deque[_Round] = deque(maxlen=max_events)
        self.requests: deque[_Request] = deque(maxlen=max_events)

    def prune(self, cutoff: float) -> None:
        for q in (self.rounds, self.requests):
            while q and q[0].t < cutoff:
                q.popleft()


Key = tuple[str, str]  # (role, name); role "all" has name ""


class NameCap:
    """At most `limit` distinct names per role; later ones become `overflow`: label cardinality is bounded."""

    def __init__(self, limit: int, overflow: str = OVERFLOW) -> None:
        self.limit, self.overflow = limit, overflow
        self._names: dict[str, set[str]] = {}

    def __call__(self, role: str, name: str) -> str:
        names = self._names.setdefault(role, set())
        if name in names:
            return name
        if len(names) >= self.limit:
            return self.overflow
        names.add(name)
        return name


class Aggregator:
    """Rolling window + totals, keyed by mode and by draft / verifier instance. Feed validated events."""

    def __init__(
        self,
        window_s: float = DEFAULT_WINDOW_S,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a positive number, got {window_s!r}")
        if max_events < 1 or max_series < 1:
            raise ValueError("max_events and max_series must be at least 1")
        self.window_s = float(window_s)
        self.max_events = max_events
        self.max_series = max_series
        self.bad_events = 0
        self._series: dict[Key, _Series] = {}
        self._totals: dict[Key, Totals] = {}
        self._bounded = NameCap(max_series)
        self._codes = NameCap(MAX_ERROR_CODES, overflow="other")

    # -- input --

    def count_bad(self) -> None:
        self.bad_events += 1

    def ingest(self, obj: Any, now: float, expect_type: str | None = None) -> dict:
        """Validate and add a decoded event; a bad one is counted in bad_events and re-raised."""
        try:
            event = validate_event(obj, expect_type)
        except EventError:
            self.count_bad()
            raise
        self.add(event, now)
        return event

    def add(self, event: dict, now: float) -> None:
        """Add an event that validate_event returned."""
        if event["type"] == "round":
            r = _Round(
                now, event["drafted"], event["accepted"], event["emitted"], event["uplink_bytes"],
                event["downlink_bytes"], event["draft_s"], event["verify_s"], event["round_s"],
            )  # fmt: skip
            for key in self._keys(event, [event["verifier_instance"]]):
                self._series_for(key, now).rounds.append(r)
                self._totals_for(key).add_round(r)
        elif event["type"] == "request":
            err = event["error"]
            q = _Request(now, event["new_tokens"], event["wall_s"], None if err is None else self._code(err))
            for key in self._keys(event, event["verifier_instances"]):
                self._series_for(key, now).requests.append(q)
                self._totals_for(key).add_request(q)
        else:  # refused by the scheduler: a request of no mode or instance, with its error, under "all"
            q = _Request(now, 0, 0.0, self._code(event["error"]))
            self._series_for(("all", ""), now).requests.append(q)
            self._totals_for(("all", "")).add_request(q)

    def _keys(self, event: dict, verifiers: Iterable[str]) -> list[Key]:
        keys: list[Key] = [("all", ""), ("mode", self._bounded("mode", event["mode"]))]
        if event["draft_instance"]:
            keys.append(("draft", self._bounded("draft", event["draft_instance"])))
        keys += sorted({("verifier", self._bounded("verifier", v)) for v in verifiers if v})
        return keys

    def _code(self, error: str) -> str:
        return self._codes("code", error_code(error))

    def _series_for(self, key: Key, now: float) -> _Series:
        # Only the touched series is pruned here (O(1) amortized per event); snapshot prunes them all.
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(self.max_events)
        s.prune(now - self.window_s)
        return s

    def _totals_for(self, key: Key) -> Totals:
        t = self._totals.get(key)
        if t is None:
            t = self._totals[key] = Totals()
        return t

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        for key in list(self._series):
            s = self._series[key]
            s.prune(cutoff)
            if not s.rounds and not s.requests:
                del self._series[key]

    # -- output --

    def snapshot(self, now: float) -> dict:
        """JSON-ready view: {"window": {...}, "totals": {...}} each as {"all": S, "mode": {name: S}, ...}."""
        self._prune(now)
        window: dict[str, Any] = {"all": summarize((), ()), **{role: {} for role in ROLES}}
        totals: dict[str, Any] = {"all": Totals().to_dict(), **{role: {} for role in ROLES}}
        for (role, name), s in sorted(self._series.items()):
            summary = summarize(s.rounds, s.requests)
            if role == "all":
                window["all"] = summary
            else:
                window[role][name] = summary
        for (role, name), t in sorted(self._totals.items()):
            if role == "all":
                totals["all"] = t.to_dict()
            else:
                totals[role][name] = t.to_dict()
        return {
            "now": now,
            "window_s": self.window_s,
            "bad_events_total": self.bad_events,
            "window": window,
            "totals": totals,
        }
