"""Link emulator: a shaping TCP proxy in front of NATS for the device-side services (`python -m draftwire.services.link_emulator`).

Compose puts it between the draft service and NATS; `draftwire up --link` runs the same proxy in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from urllib.parse import urlparse

from draftwire.shared.core.link_profile import LinkError, parse_link
from draftwire.shared.io.help_format import HelpParser
from draftwire.shared.io.link_emulator import LinkProxy
from draftwire.shared.io.service_shell import READY_PREFIX, env


def build_parser() -> argparse.ArgumentParser:
    p = HelpParser(prog="draftwire-link", description=__doc__.splitlines()[0])
    p.add_argument("--upstream", default=env("NATS_URL", "nats://127.0.0.1:4222"),
                   help="the NATS server behind the link [DRAFTWIRE_NATS_URL]")
    p.add_argument("--listen", default=env("LINK_LISTEN", "127.0.0.1:4223"),
                   help="host:port the device side connects to [DRAFTWIRE_LINK_LISTEN]")
    p.add_argument("--link", default=env("LINK", "cell-edge"),
                   help="profile (lan, 5g, cell-edge) and/or up=,down=,rtt=,jitter=,outage= [DRAFTWIRE_LINK]")
    return p


async def serve(args) -> int:
    try:
        profile = parse_link(args.link)
    except LinkError as exc:
        print(f"draftwire-link: error: {exc}", file=sys.stderr)
        return 2
    up = urlparse(args.upstream if "://" in args.upstream else f"nats://{args.upstream}")
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit() or not up.hostname:
        print("draftwire-link: error: --listen must be host:port and --upstream a NATS URL", file=sys.stderr)
        return 2
    proxy = await LinkProxy(up.hostname, up.port or 4222, profile, host or "0.0.0.0", int(port)).start()
    print(f"{READY_PREFIX} link listen={host}:{proxy.port} upstream={up.hostname}:{up.port or 4222} "
          f"{profile.describe()}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.CancelledError):
        await stop.wait()
    await proxy.stop()
    return 0


def main() -> None:
    sys.exit(asyncio.run(serve(build_parser().parse_args())))
