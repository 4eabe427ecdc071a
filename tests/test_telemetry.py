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
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from draftwire.services.telemetry.service import STATS_SUBJECT, LogLimiter
from draftwire.shared.core.telemetry_figures import (
    MAX_BYTES,
    MAX_EVENT_BYTES,
    OVERFLOW,
    SCHEMAS,
    Aggregator,
    EventError,
    TokenClock,
    decode_event,
    error_code,
    percentile,
    validate_event,
)
from draftwire.shared.core.telemetry_metrics import MAX_POSITIONS, Metrics, reported_counts
from draftwire.shared.io.bus import SUBJECTS, flush
from draftwire.shared.io.service_shell import ServiceContext, register
from tests.fake_draft import FakeDraft
from tests.in_process import scheduler
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


def rejected_event(**kw) -> dict:
    ev = {"type": "request", "rejected": True, "request_id": "", "error": "bad_encoding", "ts": 1.7e9}
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
    agg.ingest(rejected_event(error="overloaded", request_id="r9"), 0.0)
    snap = agg.snapshot(0.0)
    assert snap["window"]["all"]["errors"] == {"no_session": 1, "other": 1, "overloaded": 1, "timeout": 2}
    assert snap["totals"]["mode"]["sparse"]["errors"] == {"no_session": 1, "other": 1, "timeout": 2}
    assert snap["totals"]["all"]["requests"] == 6 and snap["totals"]["mode"]["sparse"]["requests"] == 5
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
    assert validate_event(round_event(ttft_s=0.25))["ttft_s"] == 0.25
    assert validate_event(round_event(itl_s=0, ttft_s=None))["itl_s"] == 0.0  # None: absent
    assert "ttft_s" not in validate_event(round_event()) and "rejected" not in validate_event(request_event())
    assert validate_event(request_event(rejected=False))["type"] == "request"
    assert validate_event(rejected_event(mode=3, extra=1), "request") == {
        "type": "rejected", "request_id": "", "error": "bad_encoding", "ts": 1.7e9
    }


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
    ("negative TTFT", round_event(ttft_s=-0.5), "'ttft_s' must be a finite non-negative number"),
    ("NaN ITL", round_event(itl_s=NAN), "'itl_s' must be a finite"),
    ("year-long ITL", round_event(itl_s=365 * 86400.0), "'itl_s' must be a finite non-negative number at"),
    ("TTFT and ITL", round_event(ttft_s=0.1, itl_s=0.1), "ttft_s and itl_s on a round"),
    ("TTFT, no token", round_event(accepted=0, emitted=0, ttft_s=0.1), "ttft_s on a round that emitted 0"),
    ("rejected round", round_event(rejected=True), "'rejected' must be absent, false, or true on a request"),
    ("rejected as 1", request_event(rejected=1), "'rejected' must be absent, false, or true"),
    ("rejected, no code", rejected_event(error=None), "'error' must be a non-empty string"),
    ("rejected, empty code", rejected_event(error=""), "'error' must be a non-empty string"),
    ("rejected, no ts", {"type": "request", "rejected": True, "request_id": "", "error": "x"}, "field(s) ts"),
    ("rejected, integer id", rejected_event(request_id=7), "'request_id' must be a string"),
]  # fmt: skip
GOOD = [round_event(drafted=4, accepted=3, emitted=4, ttft_s=0.2), request_event(new_tokens=20),
        rejected_event()]


def samples(metrics: Metrics) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of /metrics as Prometheus reads it, `_created` left out."""
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if not s.name.endswith("_created")}


def _good_samples() -> dict[tuple, float]:
    m = Metrics()
    for ev in GOOD:
        m.add(validate_event(ev))
    return samples(m)


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
    metrics = Metrics()  # so are the Prometheus metrics: the service counts only what validate_event returns
    for ev in [GOOD[0], event, *GOOD[1:]]:
        try:
            metrics.add(validate_event(ev))
        except EventError:
            metrics.count_bad()
    got = samples(metrics)
    assert got.pop(("draftwire_bad_events_total", ())) == 1
    assert got == {k: v for k, v in _good_samples().items() if k[0] != "draftwire_bad_events_total"}


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
            metrics = Metrics()
            metrics.add(event)
            assert all(math.isfinite(v) for v in samples(metrics).values())


def test_ingest_counts_bad_events():
    agg = Aggregator()
    with pytest.raises(EventError):
        agg.ingest({"type": "round"}, 0.0)
    agg.count_bad()
    agg.ingest(round_event(), 0.0)
    snap = agg.snapshot(0.0)
    assert snap["bad_events_total"] == 2 and snap["totals"]["all"]["rounds"] == 1


# --- pure: Prometheus metrics (prometheus_client) -----------------------------------------------------------


def families(metrics: Metrics) -> dict:
    """/metrics as Prometheus' own parser reads it: {family name: Metric}."""
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def histogram(fams: dict, name: str, **labels) -> tuple[dict[float, float], float, float]:
    """({le: cumulative count}, count, sum) of one histogram series; checks the buckets are well formed."""
    got = {"bucket": {}, "count": None, "sum": None}
    for smp in fams[name].samples:
        lab = dict(smp.labels)
        le = lab.pop("le", None)
        if lab != labels:
            continue
        if smp.name.endswith("_bucket"):
            got["bucket"][float(le)] = smp.value
        elif smp.name.endswith(("_count", "_sum")):
            got[smp.name.rsplit("_", 1)[1]] = smp.value
    buckets = [got["bucket"][le] for le in sorted(got["bucket"])]
    assert fams[name].type == "histogram" and buckets == sorted(buckets), (name, got)
    assert got["bucket"][math.inf] == got["count"], (name, got)
    return got["bucket"], got["count"], got["sum"]


def value(fams: dict, name: str, **labels) -> float:
    hits = [s.value for s in fams[name].samples if s.labels == labels and not s.name.endswith("_created")]
    assert len(hits) == 1, (name, labels, fams[name].samples)
    return hits[0]


def test_metrics_histograms_count_the_events_fed():
    m = Metrics()
    rounds = [  # one request: its first tokens after 0.3 s, then two more rounds with tokens and one without
        round_event(round=0, round_s=0.04, ttft_s=0.3),
        round_event(round=1, round_s=0.06, itl_s=0.06),
        round_event(round=2, round_s=0.012, drafted=2, accepted=0, emitted=0),
        round_event(round=3, round_s=2.5, itl_s=2.51),
        round_event(round=0, mode="full", round_s=0.05, ttft_s=45.0),
    ]
    for ev in [*rounds, request_event(wall_s=3.0), request_event(wall_s=0.2, error="timeout"),
               request_event(mode="full", wall_s=700.0)]:
        m.add(validate_event(ev))
    fams = families(m)
    buckets, count, total = histogram(fams, "draftwire_round_duration_seconds", mode="sparse")
    assert count == 4 and total == pytest.approx(0.04 + 0.06 + 0.012 + 2.5)
    assert [buckets[le] for le in (0.01, 0.02, 0.05, 0.075, 2.0, 5.0)] == [0, 1, 2, 3, 3, 4]
    buckets, count, total = histogram(fams, "draftwire_time_to_first_token_seconds", mode="sparse")
    assert (count, total, buckets[0.2], buckets[0.3]) == (1, 0.3, 0, 1)
    assert histogram(fams, "draftwire_time_to_first_token_seconds", mode="full")[1:] == (1, 45.0)
    buckets, count, total = histogram(fams, "draftwire_inter_token_latency_seconds", mode="sparse")
    assert (count, buckets[0.075], buckets[2.0]) == (2, 1, 1) and total == pytest.approx(2.57)
    buckets, count, total = histogram(fams, "draftwire_e2e_request_latency_seconds", mode="sparse")
    assert (count, total, buckets[0.25], buckets[3.0]) == (2, 3.2, 1, 2)
    buckets, count, _ = histogram(fams, "draftwire_e2e_request_latency_seconds", mode="full")
    assert count == 1 and buckets[1200.0] == 1 and buckets[600.0] == 0
    assert value(fams, "draftwire_request_errors", mode="sparse", code="timeout") == 1
    assert value(fams, "draftwire_requests", mode="sparse", draft="d1") == 2
    assert value(fams, "draftwire_generation_tokens", mode="sparse", draft="d1") == 40


def test_metrics_spec_decode_counters_and_per_position_on_hand_made_rounds():
    m = Metrics()
    # (drafted, accepted, emitted): position p counts the drafts whose first p+1 tokens were all accepted
    rounds = [(4, 4, 5), (4, 2, 3), (4, 0, 1), (2, 1, 2), (0, 0, 1), (3, 3, 3)]
    for drafted, accepted, emitted in rounds:
        m.add(validate_event(round_event(drafted=drafted, accepted=accepted, emitted=emitted)))
    m.add(validate_event(round_event(verifier_instance="v2", drafted=1, accepted=1, emitted=2)))
    fams = families(m)
    labels = {"mode": "sparse", "draft": "d1", "verifier": "v1"}
    assert value(fams, "draftwire_spec_decode_num_drafts", **labels) == 5  # drafted 0: not a draft
    assert value(fams, "draftwire_spec_decode_num_draft_tokens", **labels) == 17
    assert value(fams, "draftwire_spec_decode_num_accepted_tokens", **labels) == 10
    assert value(fams, "draftwire_spec_decode_num_emitted_tokens", **labels) == 15
    assert value(fams, "draftwire_rounds", **labels) == 6
    assert value(fams, "draftwire_uplink_bytes", **labels) == 600
    assert value(fams, "draftwire_downlink_bytes", **labels) == 240
    assert value(fams, "draftwire_draft_seconds", **labels) == pytest.approx(0.06)
    assert value(fams, "draftwire_verify_seconds", **labels) == pytest.approx(0.12)
    assert value(fams, "draftwire_spec_decode_num_drafts", mode="sparse", draft="d1", verifier="v2") == 1
    family = fams["draftwire_spec_decode_num_accepted_tokens_per_pos"]
    per_pos = {s.labels["position"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert per_pos == {"0": 5, "1": 3, "2": 2, "3": 1}  # every drafted position has its series, as vLLM's
    assert sum(per_pos.values()) == 10 + 1  # all verifiers: every accepted token at exactly one position
    weird = 'mo"de\\x\ny'  # label values are escaped: the parser reads back what went in
    m.add(validate_event(round_event(mode=weird, draft_instance="d,1", verifier_instance="")))
    labels = {"mode": weird, "draft": "d,1", "verifier": ""}
    assert value(families(m), "draftwire_rounds", **labels) == 1
    m.add(validate_event(round_event(drafted=2**20, accepted=2**20, emitted=2**20 + 1)))  # no 2^20 labels
    per_pos = [s for s in families(m)["draftwire_spec_decode_num_accepted_tokens_per_pos"].samples
               if s.name.endswith("_total") and s.labels["mode"] == "sparse"]
    assert len(per_pos) == MAX_POSITIONS


def test_metrics_count_rejected_requests_and_bad_events_and_bound_their_labels():
    m = Metrics(max_names=2, max_combinations=3)
    m.add(validate_event(rejected_event(error="bad_param")))
    m.add(validate_event(rejected_event(error="bad_param", request_id="x")))
    m.add(validate_event(rejected_event(error="overloaded: the job queue is full")))
    m.count_bad()
    for i in range(6):
        m.add(validate_event(round_event(draft_instance=f"d{i}", verifier_instance=f"v{i % 2}")))
    for i in range(70):
        m.add(validate_event(request_event(error=f"code{i}")))
    fams = families(m)
    assert value(fams, "draftwire_request_errors", mode="", code="bad_param") == 2
    assert value(fams, "draftwire_request_errors", mode="", code="overloaded") == 1
    assert value(fams, "draftwire_bad_events") == 1
    rounds = {tuple(sorted(s.labels.items())): s.value for s in fams["draftwire_rounds"].samples
              if s.name.endswith("_total")}
    assert rounds == {
        (("draft", "d0"), ("mode", "sparse"), ("verifier", "v0")): 1,
        (("draft", "d1"), ("mode", "sparse"), ("verifier", "v1")): 1,
        (("draft", OVERFLOW), ("mode", "sparse"), ("verifier", "v0")): 2,  # names past the cap of 2
        (("draft", OVERFLOW), ("mode", "sparse"), ("verifier", OVERFLOW)): 2,  # combinations past 3
    }
    codes = {s.labels["code"] for s in fams["draftwire_request_errors"].samples if s.name.endswith("_total")}
    assert len(codes) == 64 + 1 and "other" in codes  # 64 codes (2 of them refusals), then "other"


def test_loads_gauges_take_counts_only_and_bound_the_instances():
    data = {"d1": {"active": 2}, "d2": {"active": True}, "d3": None, "d4": {"active": -1}, "d5": [3],
            "d6": {"active": 2.0}, "d7": {"active": 0}, "d8": {"active": 5}, "d9": {"active": 2**40}}
    assert reported_counts(data, "active", 10) == {"d1": 2, "d7": 0, "d8": 5}
    assert reported_counts(data, "active", 2) == {"d1": 2, "d7": 0, OVERFLOW: 5}
    m = Metrics()
    m.loads.update({"d1": {"active": 3}}, {"v1": {"queue": 4, "sessions": 9}, "v2": {"queue": 0}})
    fams = families(m)
    assert value(fams, "draftwire_sessions_in_flight", draft="d1") == 3
    assert value(fams, "draftwire_verifier_queue_depth", verifier="v1") == 4
    assert value(fams, "draftwire_verifier_queue_depth", verifier="v2") == 0
    m.loads.update({}, {"v2": {"queue": 1}})  # an instance that no longer answers drops out
    fams = families(m)
    assert fams["draftwire_sessions_in_flight"].samples == []
    assert [s.labels for s in fams["draftwire_verifier_queue_depth"].samples] == [{"verifier": "v2"}]


def test_the_dashboard_and_the_scrape_config_name_what_telemetry_serves():
    import yaml

    from draftwire.services.telemetry.service import DEFAULT_HTTP_PORT

    m = Metrics()
    for ev in [round_event(ttft_s=0.1), round_event(itl_s=0.1), request_event(error="x"), rejected_event()]:
        m.add(validate_event(ev))
    m.loads.update({"d1": {"active": 1}}, {"v1": {"queue": 0}})
    served = {name for name, _ in samples(m)}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "draftwire.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"draftwire_[a-z_]+", e)}
    assert used and used <= served, used - served
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for title in ("acceptance", "tokens per second", "first token", "inter-token", "errors", "in flight"):
        assert title in titles, title
    for q in ("0.5", "0.99"):  # TTFT and ITL quantiles from the histograms
        assert sum(f"histogram_quantile({q}," in e for e in exprs) >= 2, q
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape[0]["static_configs"][0]["targets"] == [f"telemetry:{DEFAULT_HTTP_PORT}"]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert compose[name]["profiles"] == ["monitoring"]
        for volume in compose[name]["volumes"]:
            assert (REPO / volume.split(":")[0]).exists(), volume


def test_token_clock_gives_ttft_then_itl_per_round_with_tokens():
    clock = TokenClock(start=10.0)
    assert clock.lap(10.5, 0) == {}  # a round that commits nothing has no token latency
    assert clock.lap(10.75, 3) == {"ttft_s": 0.75}
    assert clock.lap(10.8, 0) == {}
    assert clock.lap(11.0, 2) == {"itl_s": pytest.approx(0.25)}
    assert clock.lap(11.5, 1) == {"itl_s": 0.5}
    resumed = TokenClock(start=3.0, resumed=True)  # a failover's run: its first tokens are not the request's
    assert resumed.lap(4.0, 2) == {"itl_s": 1.0}
    for lap in ({"ttft_s": 0.75}, {"itl_s": 0.5}):
        validate_event(round_event(**lap))


def test_log_limiter():
    lim = LogLimiter(interval=10)
    assert lim.allow(0.0) == 0
    assert lim.allow(1.0) is None and lim.allow(9.0) is None
    assert lim.allow(10.0) == 2
    assert lim.allow(10.5) is None


# --- the service, as a subprocess on a real nats-server ---------------------------------------------------


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

    async def metrics(self) -> dict:
        status, ctype, body = await self.get("/metrics")
        assert status == 200 and ctype == CONTENT_TYPE_LATEST
        return {f.name: f for f in text_string_to_metric_families(body)}

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
        sys.executable, "-m", "draftwire.services.telemetry", "--nats", nats_server.url, "--http-port", "0",
        "--instance", "telemetry-test", "--loads-interval", "0.2", cwd=REPO, env=_env(),
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
    await flush(nc)
    snap = await telemetry.wait_for(
        lambda s: s["totals"]["all"]["requests"] == 1 and s["totals"]["all"]["rounds"] == 4
    )
    w = snap["window"]["mode"]["sparse"]
    assert (w["rounds"], w["requests"], w["drafted"], w["accepted"]) == (4, 1, 16, 6)
    assert w["acceptance_rate"] == pytest.approx(6 / 16)
    assert w["tokens_per_s"] == pytest.approx(24.0)
    assert w["uplink_bytes_per_token"] == pytest.approx(400 / 10)
    assert snap["window"]["verifier"]["v1"]["rounds"] == 4 and snap["bad_events_total"] == 0

    fams = await telemetry.metrics()
    labels = {"mode": "sparse", "draft": "d1", "verifier": "v1"}
    assert value(fams, "draftwire_rounds", **labels) == 4
    assert value(fams, "draftwire_spec_decode_num_drafts", **labels) == 4
    assert value(fams, "draftwire_spec_decode_num_accepted_tokens", **labels) == 6
    assert value(fams, "draftwire_generation_tokens", mode="sparse", draft="d1") == 12
    assert histogram(fams, "draftwire_round_duration_seconds", mode="sparse")[1] == 4
    assert histogram(fams, "draftwire_e2e_request_latency_seconds", mode="sparse")[1:] == (1, 0.5)
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)

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
    assert value(await telemetry.metrics(), "draftwire_bad_events") == 6
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


async def _reporting(nc, service: str, instance: str, stats: dict):
    """A micro service instance that reports `stats` in `$SRV.STATS`, as the drafts and verifiers do."""
    ctx = ServiceContext(name=service, instance=instance, args=None, nc=nc, tracer=None)

    async def nothing(req):
        await req.respond(b"")

    endpoints = [(f"test.{instance}", nothing, instance)]
    return await register(ctx, service, "fake", endpoints, stats=lambda: stats)


async def test_service_gauges_sessions_in_flight_and_verifier_queues(telemetry, nc):
    await _reporting(nc, "draftwire-draft", "d-busy", {"active": 3, "max": 4})
    await _reporting(nc, "draftwire-draft", "d-idle", {"active": 0, "max": 4})
    verifier = await _reporting(nc, "draftwire-verifier", "v1", {"sessions": 5, "queue": 2, "busy": 1})
    await flush(nc)
    deadline = asyncio.get_running_loop().time() + 5
    while len((fams := await telemetry.metrics())["draftwire_sessions_in_flight"].samples) < 2:
        assert asyncio.get_running_loop().time() < deadline, fams["draftwire_sessions_in_flight"]
        await asyncio.sleep(0.05)
    assert value(fams, "draftwire_sessions_in_flight", draft="d-busy") == 3
    assert value(fams, "draftwire_sessions_in_flight", draft="d-idle") == 0
    assert value(fams, "draftwire_verifier_queue_depth", verifier="v1") == 2
    await verifier.stop()  # gone: its gauge goes at the next gathering
    while (await telemetry.metrics())["draftwire_verifier_queue_depth"].samples:
        assert asyncio.get_running_loop().time() < deadline + 5
        await asyncio.sleep(0.05)


async def test_requests_the_scheduler_refuses_are_counted_by_code(telemetry, nats_server, nc):
    draft = await FakeDraft(nc, "hold").start()  # the fake draft reports no events: only refusals are counted
    async with scheduler(nats_server.url):
        for data, code in [(b"\xc1\xff garbage \xfe", "bad_encoding"),
                           (json.dumps({"id": "bad-1", "prompt": "x", "top_p": 7}).encode(), "bad_param"),
                           (json.dumps({"prompt": "x", "tempreature": 1}).encode(), "bad_request"),
                           (json.dumps({"prompt": "x", "timeout_s": 0}).encode(), "bad_param")]:
            reply = json.loads((await nc.request("draftwire.prompts", data, timeout=5)).data)
            assert reply["error"]["code"] == code, reply
        dup = b'{"id": "dup", "prompt": "x"}'
        held = asyncio.ensure_future(nc.request("draftwire.prompts", dup, timeout=5))
        await asyncio.wait_for(draft.received.wait(), 5)  # stored and running: the same id is refused
        reply = json.loads((await nc.request("draftwire.prompts", dup, timeout=5)).data)
        assert reply["error"]["code"] == "duplicate_id", reply
        draft.release.set()
        assert "error" not in json.loads((await held).data)
    snap = await telemetry.wait_for(lambda s: s["totals"]["all"]["requests"] == 5)
    assert snap["totals"]["all"]["errors"] == {"bad_encoding": 1, "bad_param": 2, "bad_request": 1,
                                               "duplicate_id": 1}
    assert snap["bad_events_total"] == 0 and snap["totals"]["mode"] == {}
    fams = await telemetry.metrics()
    assert value(fams, "draftwire_request_errors", mode="", code="bad_param") == 2
    assert value(fams, "draftwire_request_errors", mode="", code="bad_encoding") == 1
    assert value(fams, "draftwire_request_errors", mode="", code="bad_request") == 1
    assert value(fams, "draftwire_request_errors", mode="", code="duplicate_id") == 1


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
    from draftwire.services.telemetry.service import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--window", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--http-port", "70000"])
    args = build_parser().parse_args(["--window", "2.5", "--http-port", "0"])
    assert args.window == 2.5 and args.http_port == 0 and not math.isnan(args.window)
