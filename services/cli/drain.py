"""`draftwire drain verifier|draft <instance|all-but-one>`: take instances out of service for maintenance.

Asks each instance on its own drain subject (`draftwire.shared.core.drain`), then asks again every quarter of a
second until it holds no session (bounded by `--timeout`) and prints what happened. A drained instance stays
up and idle, taking no session, until it is resumed (`--resume`) or stopped. `all-but-one` keeps the instance
with the most sessions (fewest to move), preferring one that is not draining already.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time

import nats.errors

from draftwire.shared.core.drain import DrainStatus, draft_drain_subject, verifier_drain_subject
from draftwire.shared.io.bus import SUBJECTS, connect
from draftwire.shared.io.loads import Reported, gather_stats
from draftwire.shared.io.service_shell import DEFAULT_NATS_URL, add_tls_flags, connection_options

SERVICES = {"verifier": "draftwire-verifier", "draft": "draftwire-draft"}
ALL_BUT_ONE = "all-but-one"
POLL_S = 0.25
REQUEST_TIMEOUT_S = 2.0
DISCOVERY_S = 1.0


def add_parser(sub) -> None:
    p = sub.add_parser("drain", help="drain verifier or draft instances for maintenance (no new sessions; "
                                     "the ones they hold finish or move)")
    p.add_argument("service", choices=tuple(SERVICES), help="which kind of instance")
    p.add_argument("instance", help=f"an instance name (as `draftwire up` or $SRV.INFO shows it) or {ALL_BUT_ONE}")
    p.add_argument("--grace", type=float, default=30.0,
                   help="verifier: seconds its sessions may keep running there before they move to another "
                        "verifier at their next round (re-prefilled there, as after a failover); 0: move now, "
                        "inf: never (wait for them to end). Drafts always finish their generations")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the instances to be drained")
    p.add_argument("--resume", action="store_true", help="end a drain instead: the instances take sessions again")
    p.add_argument("--nats", default=None, help=f"NATS URL of the stack (default {DEFAULT_NATS_URL})")
    p.add_argument("--creds", default=None,
                   help="an identity allowed to drain (on a secured stack: DIR/admin.nk)")
    add_tls_flags(p)
    p.set_defaults(func=cmd_drain)


def choose(reported: dict[str, Reported], which: str) -> tuple[list[str], str | None]:
    """(instances to drain, the one kept by `all-but-one`); ValueError naming the known instances otherwise."""
    known = ", ".join(sorted(reported)) or ("none answered: none runs, or this identity may not ask "
                                            "(secured: drain as admin)")
    if which != ALL_BUT_ONE:
        if which not in reported:
            raise ValueError(f"no instance named {which!r} (running: {known})")
        return [which], None

    def busy(name: str) -> tuple:
        data = reported[name].data or {}
        held = data.get("sessions", data.get("active", 0))
        return (data.get("draining") is True, -(held if isinstance(held, int) else 0), name)

    if len(reported) < 2:
        raise ValueError(f"{ALL_BUT_ONE} needs at least two instances (running: {known})")
    kept, *rest = sorted(reported, key=busy)
    return rest, kept


def drain_subject(service: str, instance: str, reported: Reported) -> str:
    if service == "verifier":
        return verifier_drain_subject(instance)
    device = (reported.data or {}).get("device")  # a secured draft listens under its device identity's prefix
    return draft_drain_subject(instance, SUBJECTS.device_prefix(device if isinstance(device, str) else None))


async def ask(nc, subject: str, body: dict) -> DrainStatus:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=REQUEST_TIMEOUT_S)
    return DrainStatus.decode(msg.data)


def describe(service: str, status: DrainStatus) -> str:
    if not status.draining:
        return f"{service} {status.instance}: serving ({status.sessions} session(s))"
    if status.drained:
        return f"{service} {status.instance}: drained"
    grace = "" if status.grace_left_s is None else f", they move in {status.grace_left_s:.1f} s"
    return f"{service} {status.instance}: draining, {status.sessions} session(s) held{grace}"


async def drain(args) -> int:
    nc = await connect(args.nats or DEFAULT_NATS_URL, "draftwire-drain", **connection_options(args))
    try:
        reported = await gather_stats(nc, SERVICES[args.service], window=DISCOVERY_S, quiet=0.2)
        targets, kept = choose(reported, args.instance)
        if kept is not None:
            print(f"keeping {args.service} {kept}", flush=True)
        subjects = {name: drain_subject(args.service, name, reported[name]) for name in targets}
        command = {"action": "resume"} if args.resume else {
            "action": "drain", "grace_s": None if math.isinf(args.grace) else args.grace}
        try:
            statuses = dict(zip(targets, await asyncio.gather(*(ask(nc, subjects[n], command) for n in targets)),
                                strict=True))
        except nats.errors.NoRespondersError:
            raise RuntimeError(f"an instance does not answer drain requests (an older version?): "
                               f"{', '.join(subjects.values())}") from None
        for status in statuses.values():
            print(describe(args.service, status), flush=True)
        if args.resume:
            return 0
        t0 = time.monotonic()
        while not all(s.drained for s in statuses.values()) and time.monotonic() - t0 < args.timeout:
            await asyncio.sleep(POLL_S)
            for name in [n for n, s in statuses.items() if not s.drained]:
                try:
                    statuses[name] = status = await ask(nc, subjects[name], {"action": "status"})
                except nats.errors.NoRespondersError:  # it stopped: it holds nothing any more
                    print(f"{args.service} {name}: stopped", flush=True)
                    del statuses[name]
                    continue
                if status.drained:
                    print(f"{describe(args.service, status)} in {time.monotonic() - t0:.1f} s", flush=True)
        left = [s for s in statuses.values() if not s.drained]
        for status in left:
            print(f"{describe(args.service, status)}: not drained after {args.timeout:g} s", flush=True)
        if not left:
            print(f"every instance drained: idle until stopped or `draftwire drain {args.service} NAME --resume`",
                  flush=True)
        return 1 if left else 0
    finally:
        await nc.close()


def cmd_drain(args: argparse.Namespace) -> int:
    if not args.grace >= 0 or not args.timeout >= 0:
        raise ValueError("--grace and --timeout must be >= 0")
    return asyncio.run(drain(args))


__all__ = ["ALL_BUT_ONE", "add_parser", "choose", "cmd_drain", "drain"]
