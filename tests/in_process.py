"""A service run in the test's own process, started and stopped the way shared.io.service_shell runs it."""

from __future__ import annotations

import contextlib

from opentelemetry.trace import NoOpTracer

from draftwire.services.scheduler.service import build_parser, start
from draftwire.shared.io.bus import connect, flush
from draftwire.shared.io.service_shell import ServiceContext


@contextlib.asynccontextmanager
async def running(module, url: str, instance: str, *flags: str):
    """Any draftwire service module's start() in this process, stopped in service_shell.run's order: its micro
    services, then its cleanups, then the connection drained. Yields the ServiceContext."""
    args = module.build_parser().parse_args(["--nats", url, "--instance", instance, *flags])
    nc = await connect(url, name=f"draftwire-{instance}")
    ctx = ServiceContext(name=instance, instance=instance, args=args, nc=nc, tracer=NoOpTracer())
    try:
        await module.start(ctx)
        await flush(nc)
        yield ctx
    finally:
        for svc in ctx.services:
            await svc.stop()
        for cleanup in reversed(ctx.cleanups):
            await cleanup()
        await nc.drain()


@contextlib.asynccontextmanager
async def scheduler(url: str, *flags: str, instance: str = "sched-test"):
    """The scheduler in this process; yields what its start() returns."""
    args = build_parser().parse_args(["--nats", url, "--instance", instance, *flags])
    nc = await connect(url, name=f"draftwire-scheduler-{instance}")
    ctx = ServiceContext(name="scheduler", instance=instance, args=args, nc=nc, tracer=NoOpTracer())
    sched = await start(ctx)
    try:
        yield sched
    finally:
        for cleanup in reversed(ctx.cleanups):
            await cleanup()
        for svc in ctx.services:
            await svc.stop()
        await nc.drain()


async def start_tiny_stack(store_dir: str, draft_model: str, gamma: int, env: dict | None = None):
    """A `draftwire up` stack (tkslt, fp32) with `draft_model` drafting for the tiny-random target."""
    import argparse

    from draftwire.services.cli.stack import start_stack

    args = argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model=draft_model, draft_dtype="fp32",
        target_model="tiny-random", target_dtype="fp32", mode="tkslt", gamma=gamma, k=8,
    )
    return await start_stack(args, quiet=True, store_dir=store_dir, env=env, progress=False)
