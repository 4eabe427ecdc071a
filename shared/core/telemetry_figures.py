"""Telemetry aggregation: validate events, roll them up over a time window, render JSON and Prometheus text.

Pure: no I/O and no clock. Every call that depends on time takes `now` (seconds, same clock for all calls),
so the telemetry service passes time.time() and tests pass hand-picked instants.

Two kinds of numbers come out:
- windowed gauges over the last `window_s` seconds (acceptance rate, tokens/s, bytes per token, round-time
  breakdown and percentiles), per mode and per draft / verifier instance, plus "all";
- monotonically increasing totals since start, which Prometheus turns into rates itself.

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
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


def validate_event(obj: Any, expect_type: str | None = None) -> dict:
    """Check a decoded event against its schema and return only the known fields, normalized.

    Unknown extra keys are ignored so producers can add fields before telemetry knows them. `expect_type`
    rejects e.g. a round event published on the request subject. Whatever `obj` is, the only exception is
    EventError. Besides each field's bounds, a round emits at most its accepted tokens plus the target's one.
    """
    if not isinstance(obj, Mapping):
        raise EventError(f"event must be a map, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:  # a list or map `type` is not even hashable
        raise EventError(f"event 'type' must be one of {sorted(SCHEMAS)}, got {_short(kind)}")
    if expect_type is not None and kind != expect_type:
        raise EventError(f"{kind} event on the {expect_type} subject")
    schema = SCHEMAS[kind]
    if missing := [k for k in schema if k not in obj]:
        raise EventError(f"{kind} event: missing field(s) {', '.join(missing)}")
    out: dict[str, Any] = {"type": kind}
    for key, check in schema.items():
        try:
            out[key] = check(obj[key])
        except (TypeError, ValueError) as exc:
            raise EventError(f"{kind} event: field {key!r} must be {exc}, got {_short(obj[key])}") from None
    if kind == "round" and out["accepted"] > out["drafted"]:
        raise EventError(f"round event: accepted ({out['accepted']}) > drafted ({out['drafted']})")
    if kind == "round" and out["emitted"] > out["accepted"] + 1:
        raise EventError(f"round event: emitted ({out['emitted']}) > accepted + 1 ({out['accepted'] + 1})")
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
        self._names: dict[str, set[str]] = {role: set() for role in ROLES}
        self._codes: set[str] = set()

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
        else:
            err = event["error"]
            q = _Request(now, event["new_tokens"], event["wall_s"], None if err is None else self._code(err))
            for key in self._keys(event, event["verifier_instances"]):
                self._series_for(key, now).requests.append(q)
                self._totals_for(key).add_request(q)

    def _keys(self, event: dict, verifiers: Iterable[str]) -> list[Key]:
        keys: list[Key] = [("all", ""), ("mode", self._bounded("mode", event["mode"]))]
        if event["draft_instance"]:
            keys.append(("draft", self._bounded("draft", event["draft_instance"])))
        keys += sorted({("verifier", self._bounded("verifier", v)) for v in verifiers if v})
        return keys

    def _bounded(self, role: str, name: str) -> str:
        names = self._names[role]
        if name in names:
            return name
        if len(names) >= self.max_series:
            return OVERFLOW
        names.add(name)
        return name

    def _code(self, error: str) -> str:
        code = error_code(error)
        if code not in self._codes and len(self._codes) >= MAX_ERROR_CODES:
            return "other"
        self._codes.add(code)
        return code

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


# --- Prometheus text exposition format 0.0.4 ---------------------------------------------------------------

PREFIX = "draftwire_"

# (metric, help, totals key); each becomes draftwire_<metric>{mode} and draftwire_instance_<metric>{role,...}
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("rounds_total", "Speculation rounds reported since telemetry started.", "rounds"),
    ("requests_total", "Finished requests reported since telemetry started.", "requests"),
    ("drafted_tokens_total", "Draft tokens sent for verification.", "drafted"),
    ("accepted_tokens_total", "Draft tokens accepted by the target.", "accepted"),
    ("emitted_tokens_total", "Tokens committed by rounds.", "emitted"),
    ("generated_tokens_total", "New tokens of finished requests.", "new_tokens"),
    ("uplink_bytes_total", "Encoded device-to-edge bytes of rounds.", "uplink_bytes"),
    ("downlink_bytes_total", "Encoded edge-to-device bytes of rounds.", "downlink_bytes"),
    ("draft_seconds_total", "Device draft compute time of rounds.", "draft_s"),
    ("verify_seconds_total", "Edge verification compute time of rounds.", "verify_s"),
    ("round_seconds_total", "Wall time of rounds as the device saw them.", "round_s"),
    ("request_seconds_total", "Wall time of finished requests.", "wall_s"),
)
# (metric, help, window key) for plain windowed gauges
GAUGES: tuple[tuple[str, str, str], ...] = (
    ("window_rounds", "Rounds in the window.", "rounds"),
    ("window_requests", "Requests in the window.", "requests"),
    ("acceptance_rate", "Accepted / drafted tokens over the window.", "acceptance_rate"),
    ("tokens_per_second", "New tokens / request wall time over the window.", "tokens_per_s"),
    ("round_tokens_per_second", "Emitted tokens / round wall time over the window.", "round_tokens_per_s"),
    ("uplink_bytes_per_token", "Uplink bytes / emitted tokens over the window.", "uplink_bytes_per_token"),
    (
        "downlink_bytes_per_token",
        "Downlink bytes / emitted tokens over the window.",
        "downlink_bytes_per_token",
    ),
)
PHASES = (("draft", "mean_draft_s"), ("verify", "mean_verify_s"), ("network", "mean_network_s"))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[dict[str, str], float]] = []

    def add(self, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            self.samples.append((labels, value))

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            body = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
            name = f"{self.name}{{{body}}}" if body else self.name
            lines.append(f"{name} {format_value(value)}")
        return lines


def _scoped(snapshot_part: dict) -> list[tuple[str, dict[str, str], dict]]:
    """(family infix, labels, stats) for every mode and instance series; "all" is left to PromQL sums."""
    out = [("", {"mode": name}, stats) for name, stats in snapshot_part["mode"].items()]
    for role in ("draft", "verifier"):
        out += [
            ("instance_", {"role": role, "instance": name}, stats)
            for name, stats in snapshot_part[role].items()
        ]
    return out


def render_prometheus(source: Aggregator | Mapping, now: float | None = None) -> str:
    """Prometheus text (0.0.4) of a snapshot, or of an Aggregator at `now`.

    Per-mode families are `draftwire_<metric>{mode}`, per-instance ones `draftwire_instance_<metric>{role,
    instance}` with role "draft" or "verifier": separate families, so summing one never double-counts the
    other (within the instance families, sum one role: a round counts once under each). Window ratios with
    no data are left out rather than exported as NaN.
    """
    if isinstance(source, Aggregator):
        if now is None:
            raise TypeError("render_prometheus(aggregator) needs `now`")
        source = source.snapshot(now)
    families: dict[str, _Family] = {}

    def fam(name: str, kind: str, help_text: str) -> _Family:
        f = families.get(name)
        if f is None:
            f = families[name] = _Family(PREFIX + name, kind, help_text)
        return f

    for infix in ("", "instance_"):  # declare every family, even with no samples yet, in a stable order
        for metric, help_text, _ in COUNTERS:
            fam(infix + metric, "counter", help_text)
        fam(infix + "request_errors_total", "counter", "Failed requests by error code.")
        for metric, help_text, _ in GAUGES:
            fam(infix + metric, "gauge", help_text)
        fam(
            infix + "round_phase_seconds",
            "gauge",
            "Mean per-round seconds over the window by phase (network = round - draft - verify, >= 0).",
        )
        fam(infix + "round_duration_seconds", "gauge", "Round wall-time quantiles over the window.")

    for infix, labels, stats in _scoped(source["totals"]):
        for metric, _, key in COUNTERS:
            families[infix + metric].add(labels, stats[key])
        for code, n in stats["errors"].items():
            families[infix + "request_errors_total"].add({**labels, "code": code}, n)
    for infix, labels, stats in _scoped(source["window"]):
        for metric, _, key in GAUGES:
            families[infix + metric].add(labels, stats[key])
        for phase, key in PHASES:
            families[infix + "round_phase_seconds"].add({**labels, "phase": phase}, stats[key])
        for q in QUANTILES:
            families[infix + "round_duration_seconds"].add(
                {**labels, "quantile": f"{q:g}"}, stats[f"p{_qname(q)}_round_s"]
            )
    fam("window_seconds", "gauge", "Length of the rolling window.").add({}, source["window_s"])
    fam("bad_events_total", "counter", "Events that could not be decoded or validated.").add(
        {}, source["bad_events_total"]
    )
    lines = [line for f in families.values() for line in f.render()]
    return "\n".join(lines) + "\n"
