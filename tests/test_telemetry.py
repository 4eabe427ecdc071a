"""Telemetry: the pure aggregation (hand-made events, injected time) and the real service over real NATS."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import msgpack
import pytest

from services.telemetry.service import STATS_SUBJECT, LogLimiter
from shared.core.telemetry_figures import (
    MAX_BYTES,
    MAX_EVENT_BYTES,
    OVERFLOW,
    PROMETHEUS_CONTENT_TYPE,
    SCHEMAS,
    Aggregator,
    EventError,
    decode_event,
    error_code,
    percentile,
    render_prometheus,
    validate_event,
)
from shared.io.bus import SUBJECTS
from tests.nats_fixtures import *

REPO = Path(__file__).resolve().parents[1]


def round_event(**kw) -> dict:
    ev = {
        "type": "round", "request_id": "r1", "mode": "sparse", "draft_instance": "d1",
        "verifier_instance": "v1", "round": 0, "drafted": 4, "accepted": 3, "emitted": 4,
        "uplink_bytes": 100, "downlink_bytes": 40, "draft_s": 0.01, "verify_s": 0.02, "round_s": 0.05,
        "gamma": 4, "ts": 1_700_000_000.0,
    }  # fmt: skip
    ev.update(kw)
    return ev


def request_event(**kw) -> dict:
    ev = {
        "type": "request", "request_id": "r1", "mode": "sparse", "gamma": 4, "k": 8, "draft_instance": "d1",
        "verifier_instances": ["v1"], "new_tokens": 20, "wall_s": 0.5, "tokens_per_s": 40.0,
        "acceptance_rate": 0.75, "uplink_bytes": 500, "downlink_bytes": 200, "finish_reason": "length",
        "error": None, "ts": 1_700_000_000.0,
    }  # fmt: skip
    ev.update(kw)
    return ev


def feed(agg: Aggregator, events, now: float = 0.0) -> None:
    for ev in events:
        agg.ingest(ev, now)


# --- pure: aggregation math ---------------------------------------------------------------------------------


def test_acceptance_bytes_per_token_and_throughput():
    agg = Aggregator()
    feed(agg, [
        round_event(drafted=4, accepted=4, emitted=5, uplink_bytes=100, downlink_bytes=50, round_s=0.1),
        round_event(drafted=4, accepted=1, emitted=2, uplink_bytes=80, downlink_bytes=20, round_s=0.04),
        round_event(drafted=0, accepted=0, emitted=1, uplink_bytes=10, downlink_bytes=10, round_s=0.01),
        request_event(new_tokens=30, wall_s=1.0),
        request_event(new_tokens=10, wall_s=1.0),
    ])  # fmt: skip
    s = agg.snapshot(1.0)["window"]["all"]
    assert (s["rounds"], s["requests"], s["drafted"], s["accepted"], s["emitted"]) == (3, 2, 8, 5, 8)
    assert s["acceptance_rate"] == pytest.approx(5 / 8)
    assert s["uplink_bytes_per_token"] == pytest.approx(190 / 8)
    assert s["downlink_bytes_per_token"] == pytest.approx(80 / 8)
    assert s["tokens_per_s"] == pytest.approx(40 / 2.0)
    assert s["round_tokens_per_s"] == pytest.approx(8 / 0.15)
    assert s["new_tokens"] == 40


def test_round_time_breakdown_clips_network_at_zero_and_percentiles():
    agg = Aggregator()
    feed(agg, [
        round_event(draft_s=0.01, verify_s=0.02, round_s=0.05),  # network 0.02
        round_event(draft_s=0.03, verify_s=0.03, round_s=0.05),  # clock jitter: -0.01 -> 0
        round_event(draft_s=0.02, verify_s=0.01, round_s=0.07),  # network 0.04
        round_event(draft_s=0.02, verify_s=0.02, round_s=0.09),  # network 0.05
    ])  # fmt: skip
    s = agg.snapshot(0.0)["window"]["mode"]["sparse"]
    assert s["mean_draft_s"] == pytest.approx(0.02)
    assert s["mean_verify_s"] == pytest.approx(0.02)
    assert s["mean_network_s"] == pytest.approx((0.02 + 0 + 0.04 + 0.05) / 4)
    # linear interpolation over sorted [0.05, 0.05, 0.07, 0.09]
    assert s["p50_round_s"] == pytest.approx(0.06)
    assert s["p99_round_s"] == pytest.approx(0.07 + 0.97 * 0.02)


def test_percentile():
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4, 1, 3, 2], 0.5) == pytest.approx(2.5)
    assert percentile(range(1, 101), 0.99) == pytest.approx(99.01)
    assert percentile([1, 2, 3], 0.0) == 1 and percentile([1, 2, 3], 1.0) == 3


def test_empty_window_has_null_ratios():
    s = Aggregator().snapshot(0.0)
    assert s["window"]["all"]["acceptance_rate"] is None
    assert s["window"]["all"]["p99_round_s"] is None
    assert s["window"]["mode"] == {} and s["totals"]["all"]["rounds"] == 0
    json.dumps(s, allow_nan=False)


def test_keyed_by_mode_and_instances():
    agg = Aggregator()
    feed(agg, [
        round_event(mode="sparse", draft_instance="d1", verifier_instance="v1", drafted=4, accepted=4),
        round_event(mode="full", draft_instance="d2", verifier_instance="v1", drafted=4, accepted=0,
                    emitted=1),
        round_event(mode="full", draft_instance="d2", verifier_instance="", drafted=2, accepted=1, emitted=2),
        request_event(mode="full", draft_instance="d2", verifier_instances=["v1", "v2", "v1"]),
    ])  # fmt: skip
    w = agg.snapshot(0.0)["window"]
    assert w["mode"]["sparse"]["acceptance_rate"] == 1.0
    assert w["mode"]["full"]["acceptance_rate"] == pytest.approx(1 / 6)
    assert w["draft"]["d2"]["rounds"] == 2 and w["draft"]["d1"]["rounds"] == 1
    assert w["verifier"]["v1"]["rounds"] == 2 and w["verifier"]["v1"]["acceptance_rate"] == 0.5
    assert "" not in w["verifier"]  # a round without a verifier is not a verifier series
    assert w["verifier"]["v1"]["requests"] == 1 and w["verifier"]["v2"]["requests"] == 1  # deduplicated
    assert w["all"]["rounds"] == 3 and w["all"]["requests"] == 1


def test_errors_by_code():
    agg = Aggregator()
    feed(agg, [
        request_event(error="timeout"), request_event(error="no_session: gone"),
        request_event(error="timeout"), request_event(error="Something broke badly"), request_event(),
    ])  # fmt: skip
    snap = agg.snapshot(0.0)
    assert snap["window"]["all"]["errors"] == {"no_session": 1, "other": 1, "timeout": 2}
    assert snap["totals"]["mode"]["sparse"]["errors"] == {"no_session": 1, "other": 1, "timeout": 2}
    assert error_code("verifier_error:x") == "verifier_error" and error_code("") == "other"


def test_window_expiry_with_injected_time():
    agg = Aggregator(window_s=60)
    agg.ingest(round_event(drafted=4, accepted=4), now=1000.0)
    agg.ingest(round_event(drafted=4, accepted=0, emitted=1, mode="full"), now=1030.0)
    s = agg.snapshot(1059.0)
    assert s["window"]["all"]["rounds"] == 2 and s["window"]["all"]["acceptance_rate"] == 0.5
    s = agg.snapshot(1061.0)  # the first round is older than 60 s now
    assert s["window"]["all"]["rounds"] == 1 and s["window"]["all"]["acceptance_rate"] == 0.0
    assert "sparse" not in s["window"]["mode"]
    assert s["totals"]["mode"]["sparse"]["rounds"] == 1  # counters never forget
    s = agg.snapshot(1100.0)
    assert s["window"]["all"]["rounds"] == 0 and s["window"]["mode"] == {}
    assert s["totals"]["all"]["rounds"] == 2 and s["totals"]["all"]["accepted"] == 4


def test_max_events_and_series_caps():
    agg = Aggregator(max_events=3, max_series=2)
    feed(agg, [round_event(draft_instance=f"d{i}", round=i) for i in range(5)])
    s = agg.snapshot(0.0)
    assert s["window"]["all"]["rounds"] == 3  # newest 3 kept
    assert s["totals"]["all"]["rounds"] == 5
    assert sorted(s["totals"]["draft"]) == [OVERFLOW, "d0", "d1"]
    assert s["totals"]["draft"][OVERFLOW]["rounds"] == 3


# --- pure: validation ---------------------------------------------------------------------------------------


def test_validate_event_normalizes_and_ignores_extra_keys():
    ev = validate_event(round_event(draft_s=0, future_field={"x": 1}))
    assert ev["draft_s"] == 0.0 and isinstance(ev["draft_s"], float)
    assert "future_field" not in ev
    assert validate_event(request_event(error="timeout", verifier_instances=()))["verifier_instances"] == []


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ([1, 2], "must be a map"),
        ({"type": "nope"}, "'type' must be one of"),
        ({"request_id": "r"}, "'type' must be one of"),
        ({"type": "round"}, "missing field(s) request_id"),
        (round_event(drafted=-1), "'drafted' must be a non-negative integer"),
        (round_event(drafted=True), "'drafted' must be a non-negative integer"),
        (round_event(drafted=2.0), "'drafted' must be a non-negative integer"),
        (round_event(drafted="4"), "'drafted' must be a non-negative integer"),
        (round_event(round_s=float("nan")), "'round_s' must be a finite non-negative number"),
        (round_event(verify_s=float("inf")), "'verify_s' must be a finite"),
        (round_event(draft_s=-0.1), "'draft_s' must be a finite non-negative number"),
        (round_event(request_id=""), "'request_id' must be a non-empty string"),
        (round_event(mode=None), "'mode' must be a non-empty string"),
        (round_event(mode="x" * 300), "at most 256 characters"),
        (round_event(accepted=5, drafted=4), "accepted (5) > drafted (4)"),
        (request_event(verifier_instances="v1"), "'verifier_instances' must be a list"),
        (request_event(verifier_instances=["v1", 3]), "'verifier_instances' must be a string"),
        (request_event(error=3), "'error' must be null or a string"),
        (request_event(wall_s="1"), "'wall_s' must be a finite"),
    ],
)
def test_validate_event_rejects(obj, needle):
    with pytest.raises(EventError) as info:
        validate_event(obj)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_event_expect_type_and_decode():
    with pytest.raises(EventError, match="round event on the request subject"):
        validate_event(round_event(), expect_type="request")
    assert decode_event(msgpack.packb(round_event()), "round")["drafted"] == 4
    for garbage in (b"\xc1", b"not msgpack at all", b"", msgpack.packb([1]), msgpack.packb({1: 2})):
        with pytest.raises(EventError):
            decode_event(garbage)
    with pytest.raises(EventError, match="bytes, more than"):
        decode_event(b"\x00" * (MAX_EVENT_BYTES + 1))


NAN, INF = float("nan"), float("inf")

# Every kind of impossible value an event can carry (label, event, what the error names). Each must be refused
# whole, with an error reply where there is a reply subject, and never reach the figures.
IMPOSSIBLE = [
    ("negative count", round_event(drafted=-1), "'drafted' must be a non-negative integer"),
    ("negative bytes", round_event(uplink_bytes=-5), "'uplink_bytes' must be a non-negative integer"),
    ("negative time", round_event(round_s=-0.01), "'round_s' must be a finite non-negative number"),
    ("negative wall time", request_event(wall_s=-1.0), "'wall_s' must be a finite"),
    ("NaN time", round_event(verify_s=NAN), "'verify_s' must be a finite"),
    ("NaN rate", request_event(acceptance_rate=NAN), "'acceptance_rate' must be a finite"),
    ("infinite time", round_event(draft_s=INF), "'draft_s' must be a finite"),
    ("minus infinite time", request_event(wall_s=-INF), "'wall_s' must be a finite"),
    ("infinite rate", request_event(tokens_per_s=INF), "'tokens_per_s' must be a finite"),
    ("2^63 B", round_event(uplink_bytes=2**63), "'uplink_bytes' must be a non-negative integer below 2^40"),
    ("2^40 bytes", request_event(downlink_bytes=2**40), "'downlink_bytes' must be a non-negative integer"),
    ("2^64-1 round", round_event(round=2**64 - 1), "'round' must be a non-negative integer below 2^31"),
    ("2^31 drafted", round_event(drafted=2**31, accepted=0, emitted=1), "'drafted' must be a non-negative"),
    ("2^31 new tokens", request_event(new_tokens=2**31), "'new_tokens' must be a non-negative integer below"),
    ("2^40 k", request_event(k=2**40), "'k' must be a non-negative integer below 2^31"),
    ("year-long round", round_event(round_s=365 * 86400.0), "'round_s' must be a finite non-negative number"),
    ("1e300 s request", request_event(wall_s=1e300), "'wall_s' must be a finite non-negative number at most"),
    ("ts past 2242", round_event(ts=1e300), "'ts' must be a finite non-negative number at most 2^33"),
    ("bool count", round_event(drafted=True), "'drafted' must be a non-negative integer"),
    ("bool bytes", request_event(uplink_bytes=False), "'uplink_bytes' must be a non-negative integer"),
    ("bool time", round_event(round_s=True), "'round_s' must be a finite"),
    ("bool rate", request_event(tokens_per_s=True), "'tokens_per_s' must be a finite"),
    ("float count", round_event(emitted=4.0), "'emitted' must be a non-negative integer"),
    ("string bytes", round_event(uplink_bytes="100"), "'uplink_bytes' must be a non-negative integer"),
    ("integer type", round_event(type=1), "'type' must be one of"),
    ("list type", round_event(type=["round"]), "'type' must be one of"),
    ("map type", round_event(type={"round": 1}), "'type' must be one of"),
    ("null type", round_event(type=None), "'type' must be one of"),
    ("bytes type", round_event(type=b"round"), "'type' must be one of"),
    ("integer draft instance", round_event(draft_instance=7), "'draft_instance' must be a string"),
    ("null verifier instance", round_event(verifier_instance=None), "'verifier_instance' must be a string"),
    ("integer verifier", request_event(verifier_instances=["v", 2]), "'verifier_instances' must be a string"),
    ("bytes mode", round_event(mode=b"sparse"), "'mode' must be a non-empty string"),
    ("accepted > drafted", round_event(drafted=2, accepted=3, emitted=4), "accepted (3) > drafted (2)"),
    ("emitted > accepted+1", round_event(drafted=4, accepted=1, emitted=3), "emitted (3) > accepted + 1 (2)"),
    ("acceptance rate 1.5", request_event(acceptance_rate=1.5), "'acceptance_rate' must be a finite non-neg"),
]  # fmt: skip
GOOD = [round_event(drafted=4, accepted=3, emitted=4), request_event(new_tokens=20)]


def _figures(snapshot: dict) -> dict:
    return {"window": snapshot["window"], "totals": snapshot["totals"]}


def _good_figures() -> dict:
    """What the good events alone make: the figures after any mix of them with impossible ones."""
    agg = Aggregator()
    feed(agg, GOOD)
    return json.loads(json.dumps(_figures(agg.snapshot(0.0))))


@pytest.mark.parametrize(("event", "needle"), [pytest.param(e, n, id=label) for label, e, n in IMPOSSIBLE])
def test_impossible_events_never_reach_the_figures(event, needle):
    agg = Aggregator()
    feed(agg, GOOD[:1])
    with pytest.raises(EventError) as info:
        agg.ingest(event, 0.0)
    assert needle in str(info.value)
    with pytest.raises(EventError, match=re.escape(needle)):  # the same as bytes, as the service decodes them
        decode_event(msgpack.packb(event))
    feed(agg, GOOD[1:])  # a good event after it still counts
    snap = agg.snapshot(0.0)
    assert snap["bad_events_total"] == 1
    assert _figures(snap) == _good_figures()


ODD_VALUES = [
    None, True, False, -1, 0, 1, 2**31, 2**40, 2**63, 2**64 - 1, -(2**63), 10**400, -0.0, 0.5, 1.5, 1e300,
    NAN, INF, -INF, "", "x", "7", "x" * 300, b"x", [], [1], ["v", None], ("v",), {}, {"a": 1}, object(),
]  # fmt: skip


@pytest.mark.parametrize("make", [round_event, request_event])
def test_validation_is_total_and_what_it_accepts_is_bounded(make):
    """Any value in any field: an EventError, or an event whose numbers are within bounds; nothing else."""
    base = make()
    for key in ["type", *SCHEMAS[base["type"]]]:
        for value in ODD_VALUES:
            try:
                event = validate_event({**base, key: value})
            except EventError:
                continue
            for field, v in event.items():
                if isinstance(v, int | float):
                    assert not isinstance(v, bool) and 0 <= v <= MAX_BYTES, (key, value, field)
            agg = Aggregator()
            agg.add(event, 0.0)
            json.dumps(agg.snapshot(0.0), allow_nan=False)


def test_ingest_counts_bad_events():
    agg = Aggregator()
    with pytest.raises(EventError):
        agg.ingest({"type": "round"}, 0.0)
    agg.count_bad()
    agg.ingest(round_event(), 0.0)
    snap = agg.snapshot(0.0)
    assert snap["bad_events_total"] == 2 and snap["totals"]["all"]["rounds"] == 1


# --- pure: Prometheus text ------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def parse_prometheus(text: str) -> dict[str, dict]:
    """A strict little parser of exposition format 0.0.4: {family: {"type", "help", "samples"}}."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            _, what, name, rest = line.split(" ", 3)
            fam = families.setdefault(name, {"samples": []})
            assert what.lower() not in fam, f"duplicate {what} for {name}"
            assert not fam["samples"], f"{what} after samples of {name}"
            fam[what.lower()] = rest
            continue
        assert line and not line.startswith("#"), f"unexpected line {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name, body, value = m.groups()
        labels, pos = {}, 0
        while body and pos < len(body):
            lm = _LABEL.match(body, pos)
            assert lm, f"bad labels in {line!r}"
            labels[lm.group(1)] = re.sub(
                r"\\(.)", lambda x: {"n": "\n"}.get(x.group(1), x.group(1)), lm.group(2)
            )
            pos = lm.end()
        assert name in families and "type" in families[name] and "help" in families[name], name
        families[name]["samples"].append((labels, float(value)))
    for name, fam in families.items():
        assert fam["type"] in ("counter", "gauge"), name
        assert fam["type"] != "counter" or name.endswith("_total"), name
        assert name.startswith("draftwire_"), name
    return families


def _value(families, name, **labels) -> float:
    hits = [v for lab, v in families[name]["samples"] if lab == labels]
    assert len(hits) == 1, (name, labels, families[name]["samples"])
    return hits[0]


def test_prometheus_rendering_parses_and_escapes():
    agg = Aggregator(window_s=120)
    weird = 'mo"de\\x\ny'
    feed(agg, [
        round_event(mode=weird, draft_instance="dev-1", verifier_instance="edge-1", drafted=4, accepted=3),
        round_event(mode="sparse", drafted=4, accepted=1, emitted=2, round_s=0.1, draft_s=0.05, verify_s=0.01),
        request_event(mode="sparse", error="timeout", verifier_instances=["edge-1", "edge-2"]),
    ], now=10.0)  # fmt: skip
    agg.count_bad()
    text = render_prometheus(agg, now=11.0)
    fams = parse_prometheus(text)
    assert _value(fams, "draftwire_rounds_total", mode=weird) == 1
    assert _value(fams, "draftwire_acceptance_rate", mode=weird) == 0.75
    assert _value(fams, "draftwire_acceptance_rate", mode="sparse") == 0.25
    assert _value(fams, "draftwire_request_errors_total", mode="sparse", code="timeout") == 1
    assert _value(fams, "draftwire_round_phase_seconds", mode="sparse", phase="network") == pytest.approx(
        0.04
    )
    assert _value(fams, "draftwire_round_duration_seconds", mode="sparse", quantile="0.99") == 0.1
    assert _value(fams, "draftwire_instance_rounds_total", role="verifier", instance="edge-1") == 1
    assert _value(fams, "draftwire_instance_requests_total", role="verifier", instance="edge-2") == 1
    assert _value(fams, "draftwire_instance_accepted_tokens_total", role="draft", instance="d1") == 1
    assert _value(fams, "draftwire_bad_events_total") == 1
    assert _value(fams, "draftwire_window_seconds") == 120
    # no data, no sample (rather than NaN): the request-only verifier has no acceptance rate
    assert not [
        lab for lab, _ in fams["draftwire_instance_acceptance_rate"]["samples"] if lab["instance"] == "edge-2"
    ]
    # a snapshot that went through JSON renders identically (what /stats returns is enough to rebuild /metrics)
    assert render_prometheus(json.loads(json.dumps(agg.snapshot(11.0)))) == text
    with pytest.raises(TypeError):
        render_prometheus(agg)


def test_prometheus_rendering_of_empty_aggregator():
    fams = parse_prometheus(render_prometheus(Aggregator(), now=0.0))
    assert _value(fams, "draftwire_bad_events_total") == 0
    assert fams["draftwire_rounds_total"]["samples"] == []


def test_log_limiter():
    lim = LogLimiter(interval=10)
    assert lim.allow(0.0) == 0
    assert lim.allow(1.0) is None and lim.allow(9.0) is None
    assert lim.allow(10.0) == 2
    assert lim.allow(10.5) is None


# --- the service, as a subprocess on a real nats-server --------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DRAFTWIRE_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Telemetry:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, output: list[str]) -> None:
        self.proc, self.url, self.output = proc, url, output

    async def get(self, path: str) -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            return r.status, r.headers["Content-Type"], await r.text()

    async def stats(self) -> dict:
        status, _, body = await self.get("/stats")
        assert status == 200
        return json.loads(body)

    async def wait_for(self, pred, timeout: float = 5.0) -> dict:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            snap = await self.stats()
            if pred(snap) or asyncio.get_running_loop().time() > deadline:
                return snap
            await asyncio.sleep(0.02)

    async def stop(self) -> tuple[int, str]:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(self.proc.stdout.read(), 15)
        rc = await self.proc.wait()
        return rc, "".join(self.output) + rest.decode(errors="replace")


@pytest.fixture
async def telemetry(nats_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.telemetry", "--nats", nats_server.url, "--http-port", "0",
        "--instance", "telemetry-test", cwd=REPO, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output: list[str] = []
    url = None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            output.append(line)
            assert line, "telemetry exited before it was ready:\n" + "".join(output)
            if m := re.search(r"telemetry http on (http://\S+)", line):
                url = m.group(1)
            if line.startswith("draftwire-ready telemetry"):
                break
        assert url, "".join(output)
        t = Telemetry(proc, url, output)
        yield t
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_service_aggregates_published_events(telemetry, nc):
    for i in range(4):
        event = round_event(round=i, accepted=i, emitted=i + 1)
        await nc.publish(SUBJECTS.events_round, msgpack.packb(event))
    await nc.publish(SUBJECTS.events_request, msgpack.packb(request_event(new_tokens=12, wall_s=0.5)))
    await nc.flush()
    snap = await telemetry.wait_for(
        lambda s: s["totals"]["all"]["requests"] == 1 and s["totals"]["all"]["rounds"] == 4
    )
    w = snap["window"]["mode"]["sparse"]
    assert (w["rounds"], w["requests"], w["drafted"], w["accepted"]) == (4, 1, 16, 6)
    assert w["acceptance_rate"] == pytest.approx(6 / 16)
    assert w["tokens_per_s"] == pytest.approx(24.0)
    assert w["uplink_bytes_per_token"] == pytest.approx(400 / 10)
    assert snap["window"]["verifier"]["v1"]["rounds"] == 4 and snap["bad_events_total"] == 0

    status, ctype, text = await telemetry.get("/metrics")
    assert status == 200 and ctype == PROMETHEUS_CONTENT_TYPE
    fams = parse_prometheus(text)
    assert _value(fams, "draftwire_rounds_total", mode="sparse") == 4
    assert _value(fams, "draftwire_acceptance_rate", mode="sparse") == pytest.approx(0.375)
    assert _value(fams, "draftwire_instance_generated_tokens_total", role="draft", instance="d1") == 12

    assert (await telemetry.get("/healthz"))[::2] == (200, "ok")
    assert (await telemetry.get("/nope"))[0] == 404


async def test_service_survives_bad_events_and_replies_errors(telemetry, nc):
    bad = [
        (SUBJECTS.events_round, b"\xc1\xff garbage"),
        (SUBJECTS.events_round, msgpack.packb(round_event(drafted="four"))),
        (SUBJECTS.events_request, msgpack.packb(round_event())),  # right shape, wrong subject
        ("draftwire.events.other", msgpack.packb({"type": "mystery"})),
    ]
    for subject, payload in bad:
        reply = msgpack.unpackb((await nc.request(subject, payload, timeout=5)).data)
        assert reply["error"]["code"] == "bad_event", reply
        assert reply["error"]["message"]
    assert "'drafted'" in msgpack.unpackb((await nc.request(*bad[1], timeout=5)).data)["error"]["message"]
    await nc.publish(SUBJECTS.events_round, b"no reply subject, still counted")
    ack = await nc.request(SUBJECTS.events_round, msgpack.packb(round_event()), timeout=5)
    assert msgpack.unpackb(ack.data) == {"ok": True}

    snap = await telemetry.wait_for(lambda s: s["bad_events_total"] == 6)
    assert snap["bad_events_total"] == 6 and snap["totals"]["all"]["rounds"] == 1
    fams = parse_prometheus((await telemetry.get("/metrics"))[2])
    assert _value(fams, "draftwire_bad_events_total") == 6
    rc, out = await telemetry.stop()
    assert rc in (0, -signal.SIGTERM) and "Traceback" not in out
    assert out.count("WARNING draftwire.telemetry: bad event") == 1, out  # rate-limited: one for the burst


async def test_service_refuses_every_impossible_event_with_an_error_and_keeps_the_figures(telemetry, nc):
    def subject(event: dict) -> str:
        return SUBJECTS.events_request if event.get("type") == "request" else SUBJECTS.events_round

    for label, event, needle in IMPOSSIBLE:
        reply = msgpack.unpackb((await nc.request(subject(event), msgpack.packb(event), timeout=5)).data)
        assert reply["error"]["code"] == "bad_event" and needle in reply["error"]["message"], (label, reply)
    for event in GOOD:  # good events beside them still count
        reply = await nc.request(subject(event), msgpack.packb(event), timeout=5)
        assert msgpack.unpackb(reply.data) == {"ok": True}
    snap = await telemetry.stats()
    assert snap["bad_events_total"] == len(IMPOSSIBLE)
    assert _figures(snap) == _good_figures()
    _, out = await telemetry.stop()
    assert "Traceback" not in out, out


async def test_micro_discovery_and_stats_endpoint(telemetry, nc):
    ping = json.loads((await nc.request("$SRV.PING.draftwire-telemetry", b"", timeout=5)).data)
    assert ping["name"] == "draftwire-telemetry" and ping["metadata"]["http"] == telemetry.url
    await nc.request(SUBJECTS.events_round, msgpack.packb(round_event(mode="full")), timeout=5)
    snap = json.loads((await nc.request(STATS_SUBJECT, b"", timeout=5)).data)
    assert snap["totals"]["mode"]["full"]["rounds"] == 1 and snap["window_s"] == 300


async def test_sigterm_stops_cleanly(telemetry):
    assert (await telemetry.get("/healthz"))[0] == 200
    rc, out = await telemetry.stop()
    assert rc in (0, -signal.SIGTERM), out
    assert "Traceback" not in out and "stopping" in out


async def test_healthz_503_without_nats(telemetry, nats_server):
    await nats_server.stop()
    deadline = asyncio.get_running_loop().time() + 5
    while (status := (await telemetry.get("/healthz"))[0]) == 200:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert status == 503
    rc, out = await telemetry.stop()
    assert "Traceback" not in out, out
    # shared/service.py: nc.close() after a lost connection raises ConnectionResetError, which run() reports
    # as "error: Connection lost" with exit code 1; the stop is still clean (no traceback, no hang).
    assert rc in (0, -signal.SIGTERM) or (rc == 1 and "error: Connection lost" in out), out


def test_bad_flags_fail_fast():
    from services.telemetry.service import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--window", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--http-port", "70000"])
    args = build_parser().parse_args(["--window", "2.5", "--http-port", "0"])
    assert args.window == 2.5 and args.http_port == 0 and not math.isnan(args.window)
