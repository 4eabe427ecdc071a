"""Telemetry: every draftwire event in, Prometheus metrics, JSON stats and a NATS stats endpoint out.

The events subscription has no queue group, so every telemetry instance sees every event and any one of them
can be scraped for the whole picture. The arithmetic lives in `draftwire.shared.core.telemetry_figures` (the window of
`/stats`) and `draftwire.shared.core.telemetry_metrics` (the prometheus_client registry of `/metrics`); this module only
moves bytes, reads the clock and gathers the loads the drafts and verifiers report, every --loads-interval,
so a scrape never waits on NATS. A malformed event is counted in bad_events_total, logged with a rate limit
and answered with an error when it carries a reply subject; it never stops the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable

import msgpack
from aiohttp import web
from nats.aio.msg import Msg
from nats.micro import Request
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from draftwire.shared.core.nats_permissions import SERVICE_OF_ROLE
from draftwire.shared.core.telemetry_figures import (
    DEFAULT_MAX_EVENTS,
    DEFAULT_WINDOW_S,
    Aggregator,
    EventError,
    decode_event,
)
from draftwire.shared.core.telemetry_metrics import Loads, Metrics
from draftwire.shared.io.bus import ROOT, SUBJECTS
from draftwire.shared.io.loads import gather_stats
from draftwire.shared.io.service_shell import ServiceContext, env, register, run, service_parser

log = logging.getLogger("draftwire.telemetry")

STATS_SUBJECT = f"{ROOT}.telemetry.stats"
SERVICE_NAME = "draftwire-telemetry"
# On the known subjects the event type must match; anything else under events.> is judged by its own type.
EXPECTED_TYPE = {SUBJECTS.events_round: "round", SUBJECTS.events_request: "request"}
DEFAULT_HTTP_PORT = 9464  # the OpenTelemetry Prometheus exporter's default port
BAD_EVENT_LOG_INTERVAL_S = 10.0
DEFAULT_LOADS_INTERVAL_S = 5.0
LOADS_WINDOW_S, LOADS_QUIET_S = 0.5, 0.05  # a gathering waits for the first (or each known) reply, then quiet
LOADS_FROM = (SERVICE_OF_ROLE["device"], SERVICE_OF_ROLE["edge"])  # drafts report `active`, verifiers `queue`


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    # String defaults go through `type=` like command-line values, so a bad env value fails the same way.
    p = service_parser("telemetry", __doc__.splitlines()[0])
    p.add_argument(
        "--http-host", default=env("TELEMETRY_HOST", "127.0.0.1"), help="[DRAFTWIRE_TELEMETRY_HOST]"
    )
    p.add_argument(
        "--http-port",
        type=_port,
        default=env("TELEMETRY_PORT", str(DEFAULT_HTTP_PORT)),
        help="0 picks a free port (logged) [DRAFTWIRE_TELEMETRY_PORT]",
    )
    p.add_argument(
        "--window",
        type=_positive(float),
        default=env("TELEMETRY_WINDOW", str(DEFAULT_WINDOW_S)),
        help="rolling window in seconds [DRAFTWIRE_TELEMETRY_WINDOW]",
    )
    p.add_argument(
        "--max-events",
        type=_positive(int),
        default=env("TELEMETRY_MAX_EVENTS", str(DEFAULT_MAX_EVENTS)),
        help="events kept per series and kind, whatever the window [DRAFTWIRE_TELEMETRY_MAX_EVENTS]",
    )
    p.add_argument(
        "--loads-interval",
        type=_positive(float),
        default=env("TELEMETRY_LOADS_INTERVAL", str(DEFAULT_LOADS_INTERVAL_S)),
        help="seconds between gatherings of the drafts' sessions in flight and the verifiers' queues "
        "[DRAFTWIRE_TELEMETRY_LOADS_INTERVAL]",
    )
    return p


class LogLimiter:
    """One warning per `interval` seconds at most, so a flood of garbage cannot flood the log too."""

    def __init__(self, interval: float = BAD_EVENT_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._next = -math.inf
        self._suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: stay quiet; otherwise how many were suppressed since the last warning."""
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


def error_reply(message: str) -> bytes:
    return msgpack.packb({"error": {"code": "bad_event", "message": message}})


def make_app(agg: Aggregator, registry: CollectorRegistry, healthy: Callable[[], bool]) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(agg.snapshot(time.time()))

    async def healthz(_: web.Request) -> web.Response:
        if healthy():
            return web.Response(text="ok")
        return web.Response(status=503, text="nats disconnected")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    app.router.add_get("/healthz", healthz)
    return app


async def serve_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Start the HTTP server; returns the runner (to clean up) and the URL it actually listens on."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"draftwire-telemetry: error: cannot listen on {host}:{port}: {exc}") from None
    bound_port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound_port}"


async def watch_loads(nc, loads: Loads, interval: float) -> None:
    """Gather the drafts' and verifiers' `$SRV.STATS` into `loads` every `interval` s, until cancelled."""
    seen: dict[str, set[str]] = {service: set() for service in LOADS_FROM}
    while True:
        found: dict[str, dict] = {}
        for service in LOADS_FROM:
            try:
                reported = await gather_stats(nc, service, window=LOADS_WINDOW_S, quiet=LOADS_QUIET_S,
                                              expect=seen[service])
            except Exception as exc:  # noqa: BLE001 - disconnected: no loads until the next gathering
                log.debug("gathering $SRV.STATS.%s failed: %r", service, exc)
                reported = {}
            seen[service] = set(reported)
            found[service] = {name: r.data for name, r in reported.items()}
        loads.update(*(found[service] for service in LOADS_FROM))
        await asyncio.sleep(interval)


async def start(ctx: ServiceContext) -> None:
    args = ctx.args
    agg = Aggregator(window_s=args.window, max_events=args.max_events)
    disable_created_metrics()  # this process's own registry: no `_created` series beside every counter
    metrics = Metrics()
    limiter = LogLimiter()

    async def on_event(msg: Msg) -> None:
        now = time.time()
        try:
            event = decode_event(msg.data, EXPECTED_TYPE.get(msg.subject))
        except EventError as exc:
            agg.count_bad()
            metrics.count_bad()
            suppressed = limiter.allow(time.monotonic())
            if suppressed is None:
                log.debug("bad event on %s: %s", msg.subject, exc)
            else:
                more = f" ({suppressed} more since the last warning)" if suppressed else ""
                log.warning("bad event on %s: %s%s", msg.subject, exc, more)
            if msg.reply:
                await msg.respond(error_reply(str(exc)))
            return
        agg.add(event, now)
        metrics.add(event)
        if msg.reply:  # a publisher that asks gets an ack, e.g. to know telemetry has counted it
            await msg.respond(msgpack.packb({"ok": True}))

    async def on_stats(req: Request) -> None:
        await req.respond(json.dumps(agg.snapshot(time.time())).encode())

    await ctx.nc.subscribe(SUBJECTS.events_all, cb=on_event)
    app = make_app(agg, metrics.registry, lambda: ctx.nc.is_connected)
    runner, url = await serve_http(app, args.http_host, args.http_port)
    ctx.cleanups.append(runner.cleanup)
    watcher = asyncio.create_task(watch_loads(ctx.nc, metrics.loads, args.loads_interval), name="loads")

    async def stop_watching() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    ctx.cleanups.append(stop_watching)
    await register(
        ctx,
        SERVICE_NAME,
        "rolling draftwire metrics: acceptance, throughput, bytes per token, round-time breakdown",
        [(STATS_SUBJECT, on_stats, "telemetry")],
        metadata={"http": url},
    )
    log.info("telemetry http on %s (window %gs)", url, args.window)
    ctx.ready_info["http"] = url


def main(argv: list[str] | None = None) -> None:
    run("telemetry", build_parser(), start, argv)
