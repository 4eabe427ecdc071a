"""Prometheus metrics of draftwire events, in a registry of their own (prometheus_client).

Names follow vLLM's (`vllm:spec_decode_num_drafts`, `vllm:time_to_first_token_seconds`, ...) with
`draftwire_` for `vllm:`, so what is written for vLLM reads ours with the prefix swapped. Counters only grow
and histograms keep buckets: Prometheus takes rates and quantiles itself (the windowed figures stay on
`/stats`). Label values are bounded: past the caps, names fold into OVERFLOW and error codes into "other".

Pure: validated events in (`telemetry_figures.validate_event`), no I/O and no clock; the loads the services
report (sessions in flight, verifier queues) are handed in by whoever gathers them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from draftwire.shared.core.telemetry_figures import (
    DEFAULT_MAX_SERIES,
    MAX_ERROR_CODES,
    MAX_TOKENS,
    OVERFLOW,
    NameCap,
    error_code,
)

PREFIX = "draftwire_"
MAX_POSITIONS = 32  # per-position acceptance for draft positions 0..31: bounds the labels whatever gamma says
MAX_COMBINATIONS = 1024  # (mode, draft, verifier) label sets per family; past it, draft and verifier fold
ROUND_LABELS = ("mode", "draft", "verifier")
REQUEST_LABELS = ("mode", "draft")

# Bucket bounds in seconds. A round takes tens of milliseconds on a LAN to seconds over a radio link with a
# cold prefill; a first token waits for admission, a draft slot and the prompt; a request runs up to its
# deadline (600 s by default).
ROUND_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
                 30.0, 60.0)  # fmt: skip
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                20.0, 30.0, 60.0, 120.0, 300.0)  # fmt: skip
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
                   180.0, 300.0, 600.0, 1200.0)  # fmt: skip


class Loads(Collector):
    """Gauges of what the services last reported in `$SRV.STATS`: each draft's sessions in flight (`active`:
    accepted and not finished) and each verifier's queued rounds (`queue`). A scrape reads the last gathering;
    an instance that stopped answering drops out at the next one."""

    def __init__(self, max_instances: int = DEFAULT_MAX_SERIES) -> None:
        self.max_instances = max_instances
        self.in_flight: dict[str, int] = {}
        self.queue: dict[str, int] = {}

    def update(self, drafts: Mapping[str, object], verifiers: Mapping[str, object]) -> None:
        """`drafts` and `verifiers`: instance -> its stats data (whatever it sent; None when it sent none)."""
        self.in_flight = reported_counts(drafts, "active", self.max_instances)
        self.queue = reported_counts(verifiers, "queue", self.max_instances)

    def _families(self) -> list[GaugeMetricFamily]:
        flight = GaugeMetricFamily(
            PREFIX + "sessions_in_flight",
            "Sessions each draft instance holds (accepted, not finished), as last reported.",
            labels=["draft"],
        )
        queue = GaugeMetricFamily(
            PREFIX + "verifier_queue_depth", "Rounds queued at each verifier instance, as last reported.",
            labels=["verifier"],
        )
        return [flight, queue]

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        flight, queue = self._families()
        for name, n in sorted(self.in_flight.items()):
            flight.add_metric([name], n)
        for name, n in sorted(self.queue.items()):
            queue.add_metric([name], n)
        yield from (flight, queue)


def reported_counts(data: Mapping[str, object], key: str, limit: int) -> dict[str, int]:
    """instance -> data[key] where that is a count; past `limit` instances (by name), the rest sum into
    OVERFLOW."""
    out: dict[str, int] = {}
    for name in sorted(data):
        d = data[name]
        n = d.get(key) if isinstance(d, Mapping) else None
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < MAX_TOKENS:
            continue
        label = name if len(out) < limit or name in out else OVERFLOW
        out[label] = out.get(label, 0) + n
    return out


class Metrics:
    """The registry `/metrics` exposes, fed one validated event at a time."""

    def __init__(self, registry: CollectorRegistry | None = None, max_names: int = DEFAULT_MAX_SERIES,
                 max_combinations: int = MAX_COMBINATIONS) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self._names = NameCap(max_names)
        self._codes = NameCap(MAX_ERROR_CODES, overflow="other")
        self._combinations: set[tuple[str, str, str]] = set()
        self.max_combinations = max_combinations

        def counter(name: str, doc: str, labels: tuple[str, ...] = ROUND_LABELS) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, ("mode",), registry=r, buckets=buckets)

        self.drafts = counter("spec_decode_num_drafts", "Rounds that sent draft tokens to the target.")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens sent to the target.")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens the target accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Drafts whose token at this position (from 0) was accepted, the ones before it too.",
            ("mode", "position"),
        )
        self.emitted_tokens = counter("spec_decode_num_emitted_tokens",
                                      "Tokens rounds committed: accepted ones plus the target's own.")
        self.rounds = counter("rounds", "Speculation rounds, with or without draft tokens.")
        self.uplink_bytes = counter("uplink_bytes", "Encoded device-to-edge bytes of rounds.")
        self.downlink_bytes = counter("downlink_bytes", "Encoded edge-to-device bytes of rounds.")
        self.draft_seconds = counter("draft_seconds", "Device draft compute time of rounds.")
        self.verify_seconds = counter("verify_seconds", "Edge verification compute time of rounds.")
        self.requests = counter("requests", "Requests a draft finished, failed ones included.",
                                REQUEST_LABELS)
        self.generation_tokens = counter("generation_tokens", "New tokens of finished requests.",
                                         REQUEST_LABELS)
        self.request_errors = counter(
            "request_errors",
            "Requests that ended in an error, by code; mode is empty for those the scheduler refused.",
            ("mode", "code"),
        )
        self.bad_events = counter("bad_events", "Events that could not be decoded or validated.", ())
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "From the draft accepting the job to its first committed tokens.",
            TTFT_BUCKETS)
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Between consecutive rounds of a request that commit tokens.",
            ROUND_BUCKETS)
        self.round_duration = histogram("round_duration_seconds",
                                        "Wall time of a round as the device saw it.", ROUND_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Wall time of a request on its draft, failed ones included.",
                                             REQUEST_BUCKETS)
        self.loads = Loads(max_names)
        r.register(self.loads)

    def count_bad(self) -> None:
        self.bad_events.inc()

    def add(self, event: dict) -> None:
        """Count an event that `validate_event` returned."""
        if event["type"] == "round":
            self._round(event)
        elif event["type"] == "request":
            mode, draft = self._names("mode", event["mode"]), self._names("draft", event["draft_instance"])
            self.requests.labels(mode, draft).inc()
            self.generation_tokens.labels(mode, draft).inc(event["new_tokens"])
            self.e2e_request_latency.labels(mode).observe(event["wall_s"])
            if event["error"] is not None:
                self.request_errors.labels(mode, self._codes("code", error_code(event["error"]))).inc()
        else:  # rejected by the scheduler
            self.request_errors.labels("", self._codes("code", error_code(event["error"]))).inc()

    def _round(self, e: dict) -> None:
        mode = self._names("mode", e["mode"])
        labels = (mode, self._names("draft", e["draft_instance"]),
                  self._names("verifier", e["verifier_instance"]))
        if labels not in self._combinations:
            if len(self._combinations) >= self.max_combinations:
                labels = (mode, OVERFLOW, OVERFLOW)
            self._combinations.add(labels)
        self.rounds.labels(*labels).inc()
        if e["drafted"]:
            self.drafts.labels(*labels).inc()
        self.draft_tokens.labels(*labels).inc(e["drafted"])
        self.accepted_tokens.labels(*labels).inc(e["accepted"])
        self.emitted_tokens.labels(*labels).inc(e["emitted"])
        self.uplink_bytes.labels(*labels).inc(e["uplink_bytes"])
        self.downlink_bytes.labels(*labels).inc(e["downlink_bytes"])
        self.draft_seconds.labels(*labels).inc(e["draft_s"])
        self.verify_seconds.labels(*labels).inc(e["verify_s"])
        # every position drafted gets its series (at 0 until accepted there), as vLLM's; accepted is a prefix
        for pos in range(min(e["drafted"], MAX_POSITIONS)):
            child = self.accepted_per_pos.labels(mode, str(pos))
            if pos < e["accepted"]:
                child.inc()
        self.round_duration.labels(mode).observe(e["round_s"])
        if "ttft_s" in e:
            self.time_to_first_token.labels(mode).observe(e["ttft_s"])
        if "itl_s" in e:
            self.inter_token_latency.labels(mode).observe(e["itl_s"])
