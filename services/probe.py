"""`python -m draftwire.services.probe NAME`: exit 0 if the draftwire service NAME answers `$SRV.PING` on NATS.

Container health checks use it, so "healthy" means the service is registered and its event loop answers,
not merely that the process exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from draftwire.shared.io.bus import connect
from draftwire.shared.io.help_format import HelpParser
from draftwire.shared.io.service_shell import DEFAULT_NATS_URL, add_tls_flags, connection_options, env


async def _ping(url: str, name: str, timeout: float, options: dict) -> bool:
    nc = await connect(url, f"draftwire-probe-{name}", initial_timeout=timeout, **options)
    try:
        msg = await nc.request(f"$SRV.PING.draftwire-{name}", b"", timeout=timeout)
        return json.loads(msg.data).get("name") == f"draftwire-{name}"
    finally:
        await nc.close()


def build_parser() -> argparse.ArgumentParser:
    p = HelpParser(prog="python -m draftwire.services.probe", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=("scheduler", "draft", "verifier", "telemetry", "gateway"),
                   help="the service to ping")
    p.add_argument("--nats", default=env("NATS_URL", DEFAULT_NATS_URL), help="NATS URL, or URL1,URL2,... of a cluster [DRAFTWIRE_NATS_URL]")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the service's answer")
    p.add_argument("--creds", default=env("CREDS"), help="the service's own identity, secured [DRAFTWIRE_CREDS]")
    add_tls_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ok = asyncio.run(_ping(args.nats, args.name, args.timeout, connection_options(args)))
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        print(f"draftwire-probe: {args.name}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
