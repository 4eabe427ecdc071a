"""A radio-like link between device and edge, described by rates, delay, jitter and outages. Pure, no I/O.

`LinkProfile` is what `--link` parses into (a named profile, `key=value` overrides, or both:
`cell-edge,rtt=80ms`). `Shaper` turns a byte stream into delivery times for one direction: a FIFO
bottleneck at the direction's rate (so big messages queue behind each other), then half the RTT plus jitter
(never reordering), with delivery postponed past any outage window. `draftwire.shared.io.link_emulator` applies it to real
sockets; `bench` uses the same profile for its predictions.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace


class LinkError(ValueError):
    """A `--link` value that cannot be understood; the message says what is expected."""


@dataclass(frozen=True)
class LinkProfile:
    name: str
    up_bps: float  # device -> edge, bits per second
    down_bps: float  # edge -> device
    rtt_s: float  # round-trip propagation delay (half each way)
    jitter_s: float = 0.0  # uniform extra one-way delay in [0, jitter]
    outage_every_s: float = 0.0  # 0: never; else the link is down for `outage_s` at the end of every period
    outage_s: float = 0.0

    def __post_init__(self) -> None:
        if not (self.up_bps > 0 and self.down_bps > 0):
            raise LinkError(f"link rates must be > 0, got up={self.up_bps} down={self.down_bps}")
        if self.rtt_s < 0 or self.jitter_s < 0 or self.outage_s < 0 or self.outage_every_s < 0:
            raise LinkError("link delays and outages must be >= 0")
        if self.outage_every_s and self.outage_s >= self.outage_every_s:
            raise LinkError(f"an outage of {self.outage_s}s every {self.outage_every_s}s leaves no time up")

    def up_seconds(self, nbytes: float) -> float:
        return nbytes * 8.0 / self.up_bps

    def down_seconds(self, nbytes: float) -> float:
        return nbytes * 8.0 / self.down_bps

    def describe(self) -> str:
        text = (f"{self.name}: up {_fmt_rate(self.up_bps)}, down {_fmt_rate(self.down_bps)}, "
                f"rtt {self.rtt_s * 1e3:g} ms")
        if self.jitter_s:
            text += f", jitter {self.jitter_s * 1e3:g} ms"
        if self.outage_every_s:
            text += f", {self.outage_s:g}s outage every {self.outage_every_s:g}s"
        return text


PROFILES = {
    "lan": LinkProfile("lan", up_bps=1e9, down_bps=1e9, rtt_s=0.001),
    "5g": LinkProfile("5g", up_bps=50e6, down_bps=200e6, rtt_s=0.020, jitter_s=0.002),
    "cell-edge": LinkProfile("cell-edge", up_bps=2e6, down_bps=10e6, rtt_s=0.040, jitter_s=0.004),
}

_RATE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)(?:bit/s|bps|b)?$", re.IGNORECASE)
_TIME = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(us|ms|s)?$", re.IGNORECASE)
_RATE_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_TIME_UNITS = {None: 1e-3, "us": 1e-6, "ms": 1e-3, "s": 1.0}  # a bare number is milliseconds
_KEYS = ("up", "down", "rtt", "jitter", "outage")


def parse_rate(text: str) -> float:
    """'2M', '2Mbit/s', '500k', '1e6' -> bits per second."""
    m = _RATE.match(text.strip())
    if not m:
        raise LinkError(f"bad rate {text!r}: expected a number of bits/s with an optional k, M or G (e.g. 2M)")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def parse_time(text: str) -> float:
    """'40ms', '0.04s', '40' (milliseconds) -> seconds."""
    m = _TIME.match(text.strip())
    if not m:
        raise LinkError(f"bad duration {text!r}: expected e.g. 40ms, 0.5s or 800us")
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _TIME_UNITS[unit]


def parse_link(spec: str) -> LinkProfile:
    """`cell-edge`, `up=2M,down=10M,rtt=40ms`, `5g,rtt=80ms,jitter=5ms`, `lan,outage=1s/10s`."""
    if not spec or not spec.strip():
        raise LinkError("empty --link; give a profile name or up=...,down=...,rtt=...")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    base: LinkProfile | None = None
    if "=" not in parts[0]:
        name = parts.pop(0)
        if name not in PROFILES:
            raise LinkError(f"unknown link profile {name!r}; known: {', '.join(PROFILES)}")
        base = PROFILES[name]
    fields: dict = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _KEYS:
            raise LinkError(f"bad link setting {part!r}: expected one of {', '.join(k + '=' for k in _KEYS)}")
        if key in ("up", "down"):
            fields[f"{key}_bps"] = parse_rate(value)
        elif key in ("rtt", "jitter"):
            fields[f"{key}_s"] = parse_time(value)
        else:
            length, slash, period = value.partition("/")
            if not slash:
                raise LinkError(f"bad outage {value!r}: expected DURATION/PERIOD, e.g. 1s/10s")
            fields["outage_s"], fields["outage_every_s"] = parse_time(length), parse_time(period)
    if base is None:
        missing = [k for k in ("up_bps", "down_bps", "rtt_s") if k not in fields]
        if missing:
            raise LinkError(f"a custom link needs up=, down= and rtt= (missing {', '.join(missing)})")
        return LinkProfile(name=spec.strip(), **fields)
    return replace(base, name=spec.strip() if fields else base.name, **fields)


def _fmt_rate(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps:g} bit/s"


@dataclass
class Shaper:
    """Delivery schedule of one direction: call `deliver_at(now, nbytes)` for each chunk, in order."""

    bps: float
    delay_s: float
    jitter_s: float = 0.0
    outage_every_s: float = 0.0
    outage_s: float = 0.0
    seed: int = 0
    _free_at: float = 0.0  # when the bottleneck finishes what it was given
    _last: float = 0.0  # the previous delivery: a link never reorders
    _rng: random.Random | None = None

    @classmethod
    def uplink(cls, p: LinkProfile, seed: int = 0) -> Shaper:
        return cls(p.up_bps, p.rtt_s / 2, p.jitter_s, p.outage_every_s, p.outage_s, seed)

    @classmethod
    def downlink(cls, p: LinkProfile, seed: int = 1) -> Shaper:
        return cls(p.down_bps, p.rtt_s / 2, p.jitter_s, p.outage_every_s, p.outage_s, seed)

    def deliver_at(self, now: float, nbytes: int) -> float:
        if self._rng is None:
            self._rng = random.Random(self.seed)
        start = self._after_outage(max(now, self._free_at))
        self._free_at = start + nbytes * 8.0 / self.bps
        jitter = self._rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0
        at = self._after_outage(self._free_at + self.delay_s + jitter)
        self._last = max(at, self._last)
        return self._last

    def _after_outage(self, t: float) -> float:
        """Outages take the last `outage_s` of every period: a time inside one moves to its end."""
        if not self.outage_every_s:
            return t
        phase = t % self.outage_every_s
        down_from = self.outage_every_s - self.outage_s
        return t + (self.outage_every_s - phase) if phase >= down_from else t
