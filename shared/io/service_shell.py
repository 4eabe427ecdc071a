"""The thin async shell every service shares: configuration, NATS, tracing, discovery and shutdown.

A service module only declares its flags and a `start(ctx)` coroutine that subscribes its handlers; this
module parses flags (each with an environment-variable default, so compose files and `draftwire up`
configure services the same way), connects to NATS, sets up OpenTelemetry, prints one ready line, and on
SIGTERM/SIGINT stops the micro services, drains the connection and flushes spans. SIGUSR1 logs every asyncio
task's stack and every thread's (`dump_stacks`): what an operator needs when work stalls without an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.micro import Service

from draftwire.shared.io.bus import connect, flush, validate_token
from draftwire.shared.io.help_format import HelpParser
from draftwire.shared.io.tracing import setup_tracing, shutdown_tracing

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
READY_PREFIX = "draftwire-ready"
VERSION = "0.1.0"

log = logging.getLogger("draftwire")


def env(name: str, default: str | None = None) -> str | None:
    """Read `DRAFTWIRE_<name>`; every service flag has one (listed by `--help`)."""
    return os.environ.get(f"DRAFTWIRE_{name}", default)


def env_int(name: str, default: int) -> int:
    raw = env(name)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError:
        raise SystemExit(f"draftwire: error: DRAFTWIRE_{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = env(name)
    try:
        return float(raw) if raw not in (None, "") else default
    except ValueError:
        raise SystemExit(f"draftwire: error: DRAFTWIRE_{name} must be a number, got {raw!r}") from None


def default_instance(service: str, pid: int | None = None) -> str:
    return f"{service}-{socket.gethostname().split('.')[0]}-{os.getpid() if pid is None else pid}"


def service_parser(service: str, description: str) -> argparse.ArgumentParser:
    p = HelpParser(prog=f"python -m draftwire.services.{service}", description=description)
    p.add_argument("--nats", default=env("NATS_URL", DEFAULT_NATS_URL),
                   help="NATS URL, or URL1,URL2,... of a cluster's nodes [DRAFTWIRE_NATS_URL]")
    p.add_argument(
        "--instance",
        default=env("INSTANCE") or default_instance(service),
        help="instance name, unique per process [DRAFTWIRE_INSTANCE]",
    )
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                   help="Python logging level: DEBUG, INFO, WARNING, ERROR [DRAFTWIRE_LOG_LEVEL]")
    p.add_argument("--creds", default=env("CREDS"),
                   help="this service's nkey seed file (`draftwire up --secure DIR` writes one per role); "
                        "without it the connection is anonymous [DRAFTWIRE_CREDS]")
    add_tls_flags(p)
    p.add_argument(
        "--torch-threads", type=int, default=env_int("TORCH_THREADS", 0),
        help="torch intra-op threads, 0 = torch's default; give each model service its own cores when "
        "several share a machine, or they slow each other down many times over [DRAFTWIRE_TORCH_THREADS]",
    )
    return p


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """`--tls-ca` (trust this CA: the connection to NATS is TLS) and, for mutual TLS, `--tls-cert`/`--tls-key`."""
    p.add_argument("--tls-ca", default=env("TLS_CA"), help="CA that signed the NATS server's certificate; "
                   "turns TLS on (`draftwire certs DIR` makes development ones) [DRAFTWIRE_TLS_CA]")
    p.add_argument("--tls-cert", default=env("TLS_CERT"), help="client certificate, where the server asks for one "
                   "[DRAFTWIRE_TLS_CERT]")
    p.add_argument("--tls-key", default=env("TLS_KEY"), help="its private key [DRAFTWIRE_TLS_KEY]")


def connection_options(args: argparse.Namespace) -> dict:
    """connect() options from --creds and --tls-*: the identity to sign in as, and the TLS context."""
    opts: dict = {"creds": getattr(args, "creds", None) or None}
    if ca := getattr(args, "tls_ca", None):
        from draftwire.shared.io.tls import client_context

        opts["tls"] = client_context(ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    return opts


def add_model_flags(p: argparse.ArgumentParser, role: str, default_dtype: str) -> None:
    """`--<role>-model` / `--<role>-dtype` / `--<role>-device` with `DRAFTWIRE_<ROLE>_MODEL|DTYPE|DEVICE`
    defaults (draft and verifier)."""
    key = role.upper()
    p.add_argument(f"--{role}-model", default=env(f"{key}_MODEL", "smollm2-135m"),
                   help=f"catalog name, HF dir, .gguf file or hub id [DRAFTWIRE_{key}_MODEL]")
    p.add_argument(f"--{role}-dtype", default=env(f"{key}_DTYPE", default_dtype), choices=("fp32", "bf16", "int8"),
                   help=f"weights' dtype (int8: dynamically quantized linear layers) [DRAFTWIRE_{key}_DTYPE]")
    p.add_argument(f"--{role}-device", default=env(f"{key}_DEVICE", "cpu"), choices=("cpu", "cuda", "auto"),
                   help=f"where the model runs; auto = cuda when torch sees one (int8: cpu) [DRAFTWIRE_{key}_DEVICE]")


@dataclass
class ServiceContext:
    name: str
    instance: str
    args: argparse.Namespace
    nc: Client
    tracer: object
    services: list[Service] = field(default_factory=list)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ready_info: dict[str, str] = field(default_factory=dict)  # extra `key=value`s for the ready line


StartFn = Callable[[ServiceContext], Awaitable[None]]


def run(name: str, parser: argparse.ArgumentParser, start: StartFn, argv: list[str] | None = None) -> None:
    """Entry point of `python -m draftwire.services.<name>`: never returns normally until a signal arrives."""
    args = parser.parse_args(argv)
    try:
        validate_token(args.instance, "instance")
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {name}[{args.instance}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_serve(name, args, start))
    except ConnectionError as exc:
        print(f"draftwire-{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


async def _serve(name: str, args: argparse.Namespace, start: StartFn) -> None:
    if getattr(args, "torch_threads", 0) > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    tracer = setup_tracing(f"draftwire-{name}", args.instance)
    if not getattr(args, "creds", None):
        log.warning("INSECURE: connecting to NATS without credentials; anyone who reaches the server can read "
                    "and forge this service's traffic (run `draftwire up --secure DIR` or pass --creds)")
    nc = await connect(args.nats, name=f"draftwire-{name}-{args.instance}", **connection_options(args))
    ctx = ServiceContext(name=name, instance=args.instance, args=args, nc=nc, tracer=tracer)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: log.warning("%s", dump_stacks()))
    try:
        await start(ctx)
        await flush(nc)
        extra = "".join(f" {k}={v}" for k, v in ctx.ready_info.items())
        print(f"{READY_PREFIX} {name} instance={args.instance} nats={args.nats}{extra}", flush=True)
        await ctx.stopping.wait()
        log.info("stopping")
    finally:
        # Endpoints first, so nothing new arrives (and fails) while the service takes itself apart: a round
        # or job sent now finds another instance, or "no responders", instead of a half-stopped one.
        for svc in ctx.services:
            try:
                await svc.stop()
            except Exception:
                log.exception("stopping micro service failed")
        for cleanup in reversed(ctx.cleanups):
            try:
                await cleanup()
            except Exception:
                log.exception("cleanup failed")
        if not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:  # noqa: BLE001 - already disconnected: nothing left to flush
                with contextlib.suppress(Exception):
                    await nc.close()
        await asyncio.to_thread(shutdown_tracing)


def dump_stacks() -> str:
    """Every asyncio task's and every thread's stack, as text (what SIGUSR1 logs)."""
    out = []
    for task in asyncio.all_tasks():
        out.append(f"--- task {task.get_name()}")
        awaiting, depth = task.get_coro(), 0
        while awaiting is not None and depth < 30:  # the chain of awaits, outermost first
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
            if frame is not None:
                out.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
            depth += 1
        if awaiting is not None:
            out.append(f"  awaiting {awaiting!r}")
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, ident)}")
        out.extend(traceback.format_stack(frame, limit=12))
    return "\n".join(line.rstrip() for line in out)


Endpoint = tuple[str, Callable, str]  # (subject, handler, queue group)


async def register(
    ctx: ServiceContext,
    name: str,
    description: str,
    endpoints: list[Endpoint],
    metadata: dict[str, str] | None = None,
    stats: Callable[[], dict] | None = None,
) -> Service:
    """Register a nats.micro service (so `$SRV.PING|INFO|STATS` find it) with per-endpoint queue groups.

    `stats` returns this instance's load (a JSON-able dict), sent as every endpoint's `data` in the
    `$SRV.STATS` reply, which is where placement reads it (`draftwire.shared.io.loads`). A callback that raises
    reports no load rather than leaving the stats request unanswered.
    """
    from nats.micro import add_service

    from draftwire.shared.io.bus import endpoint_name

    def stats_handler(_endpoint) -> dict | None:
        try:
            return stats()
        except Exception:  # the rest of the stats reply is still worth sending
            log.exception("the stats callback of %s failed", name)
            return None

    svc = await add_service(
        ctx.nc,
        name=name,
        version=VERSION,
        description=description,
        metadata={"instance": ctx.instance, **(metadata or {})},
        stats_handler=stats_handler if stats is not None else None,
    )
    for subject, handler, queue in endpoints:
        await svc.add_endpoint(name=endpoint_name(subject), subject=subject, handler=handler, queue_group=queue)
    ctx.services.append(svc)
    return svc
