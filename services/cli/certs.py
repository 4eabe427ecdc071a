"""`draftwire certs DIR`: development TLS certificates for NATS, and how the services use them."""

from __future__ import annotations

import argparse
from pathlib import Path

from draftwire.shared.io.tls import DEFAULT_HOSTS, make_client_cert, make_dev_certs, server_tls_block

ENV_CA, ENV_CERT, ENV_KEY = "DRAFTWIRE_TLS_CA", "DRAFTWIRE_TLS_CERT", "DRAFTWIRE_TLS_KEY"


def add_parser(sub) -> None:
    p = sub.add_parser("certs", help="make (or reuse) development TLS certificates for NATS in DIR")
    p.add_argument("dir", type=Path, help="output directory (created 0700; existing valid certificates are kept)")
    p.add_argument("--host", action="append", default=[], metavar="H",
                   help=f"another name or IP the server is reached at (repeatable; always: {', '.join(DEFAULT_HOSTS)})")
    p.add_argument("--client", action="append", default=[], metavar="NAME",
                   help="also a client certificate NAME.pem for mutual TLS (repeatable)")
    p.set_defaults(func=cmd_certs)


def cmd_certs(args: argparse.Namespace) -> int:
    hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *args.host]))
    before = _read(args.dir / "server.pem")
    files = make_dev_certs(args.dir, hosts)
    clients = [make_client_cert(args.dir, name) for name in args.client]
    what = "kept the existing" if _read(files.cert) == before else "wrote"
    print(f"{what} development TLS certificates in {args.dir.resolve()} (not for production: use your own CA)")
    rows = [
        (files.ca, "the dev CA: every service trusts it (copy it to devices)"),
        (args.dir / "ca-key.pem", "the CA's private key: signs the others; keep it private"),
        (files.cert, f"nats-server's certificate, for {', '.join(hosts)}"),
        (files.key, "nats-server's private key"),
    ]
    rows += [r for c in clients for r in ((c.cert, "a client certificate for mutual TLS"), (c.key, "its key"))]
    for path, text in rows:
        print(f"  {path.name:<18} {text}")
    print("\na service connects to NATS over TLS with")
    print(f"  export {ENV_CA}={files.ca.resolve()}")
    client = clients[0] if clients else None
    if client is not None:
        print(f"  export {ENV_CERT}={client.cert.resolve()}   # only when the server verifies clients")
        print(f"  export {ENV_KEY}={client.key.resolve()}")
    else:
        print(f"  # and {ENV_CERT}/{ENV_KEY}: a client certificate, when the server verifies clients (--client)")
    print("\nnats-server config (add `verify: true` to require client certificates):")
    print(server_tls_block(files), end="")
    return 0


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None
