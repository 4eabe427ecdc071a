"""A device site's own nats-server, joined to the edge as a leaf node: a local bus and one link to the edge.

The device's services connect to the leaf server next to them; the leaf keeps one connection (its "remote")
to the edge's leafnode listener and carries across it only the subjects someone on the other side listens to.
When that link drops, the leaf redials every `reconnect` (1 s) and re-announces its subscriptions; what was in
flight is lost and the services recover it (docs/scale_out.md).

JetStream stays at the edge. A leaf never passes the plain JetStream API (`$JS.API.>`) over its link, by
design: each side could run its own JetStream, and a request must not reach both. So the edge names its
JetStream **domain** (`EDGE_DOMAIN`), the leaf runs without JetStream, and a subject mapping on the leaf turns
the device's `$JS.API.>` into `$JS.<domain>.API.>`, which crosses the link and which the edge maps back: the
draft service's unchanged JetStream calls (the `DRAFTWIRE_DONE` results, the `DRAFTWIRE_VOCAB` tokenizer
store) reach the edge's streams (nats-server's `default_js_domain` does the same mapping but is deprecated).
Secured, the link signs in as the device identity (its nkey seed), so at the edge the whole site holds that
identity's allow-lists, and TLS covers the link as it covers every client.

Put the link emulator on the link by pointing the leaf's remote at the emulator's listen port and the
emulator at the edge's leafnode port (`leafnode_port`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from nats.aio.client import Client

from draftwire.shared.io.nats_server import EmbeddedNats

EDGE_DOMAIN = "edge"
"""The JetStream domain of the edge's servers; the device sites' leaves reach it by this name."""

RECONNECT_S = 1.0  # how often a leaf redials the edge after losing the link (nats-server's default)
NO_JETSTREAM = ("-js=false",)  # after EmbeddedNats's own `-js`: the last flag wins
_LISTENING = re.compile(r"Listening for leafnode connections on (\S+):(\d+)")


def _q(value: str | os.PathLike[str]) -> str:
    """A nats-server config string (JSON's double-quoted form is accepted)."""
    return json.dumps(str(value))


def edge_config(listen: str = "127.0.0.1:-1", domain: str = EDGE_DOMAIN, tls: str = "") -> str:
    """The edge server's part (its `config_extra`): JetStream's domain and the leafnode listener.

    `tls` is a `tls { ... }` block for the listener (`tls.server_tls_block`). No `authorization` here on
    purpose: a leaf then signs in as one of the server's users, and its traffic is held to that user's
    permissions, as a client's would be. `no_advertise`: leaves dial the URLs they are given, never this
    server's own addresses. `-1` picks a free port (find it with `leafnode_port`).
    """
    return (f"jetstream {{\n  domain: {_q(domain)}\n}}\n"
            f"leafnodes {{\n  listen: {_q(listen)}\n  no_advertise: true\n{tls}}}\n")


def leaf_config(remotes: Sequence[str], domain: str = EDGE_DOMAIN, *, seed: str | None = None,
                ca: str | os.PathLike[str] | None = None, reconnect_s: float = RECONNECT_S) -> str:
    """The leaf server's part: its remote (the edge's leafnode URLs, `nats-leaf://host:port`; several for a
    cluster) and the mapping of the JetStream API into the edge's domain.

    The leaf dials only these URLs, never the addresses the edge advertises: those are the edge's own, which
    a device site may not reach, and dialling them would go around a link emulator. `seed` is the nkey seed
    (the text of an identity's `.nk` file) the link signs in with; `ca` the CA that signed the edge's
    certificate (TLS on the link).
    """
    if not remotes:
        raise ValueError("a leaf needs at least one remote URL (the edge's leafnode listener)")
    urls = ", ".join(_q(u) for u in remotes)
    remote = [f"urls: [{urls}]", "ignore_discovered_servers: true"]
    if seed is not None:
        remote.append(f"nkey: {_q(seed.strip())}")
    if ca is not None:
        remote.append(f"tls {{ ca_file: {_q(Path(ca).resolve())} }}")
    body = "\n      ".join(remote)
    return (f"mappings {{\n  \"$JS.API.>\": {_q(f'$JS.{domain}.API.>')}\n}}\n"
            f"leafnodes {{\n  reconnect: \"{reconnect_s:g}s\"\n"
            f"  remotes: [\n    {{\n      {body}\n    }}\n  ]\n}}\n")


def leafnode_port(edge: EmbeddedNats) -> int:
    """The edge's leafnode port, read from its log (the ports file names client ports only)."""
    text = edge.log_path.read_text(errors="replace") if edge.log_path is not None else ""
    if (found := _LISTENING.search(text)) is None:
        raise RuntimeError(f"the server listens for no leaf nodes (a `leafnodes {{ listen }}` block?):\n"
                           f"{edge.log_tail()}")
    return int(found.group(2))


def leaf_url(host: str, port: int) -> str:
    return f"nats-leaf://{host}:{port}"


def leaf_server(remotes: Sequence[str], port: int | None = None, *, domain: str = EDGE_DOMAIN,
                seed: str | None = None, ca: str | os.PathLike[str] | None = None, local: str = "",
                **kw) -> EmbeddedNats:
    """A leaf nats-server (not started) for a device site, without JetStream of its own.

    `local` is config for its own clients (the `authorization` block that admits the device identity, a
    `tls` block); `kw` goes to `EmbeddedNats`.
    """
    extra = leaf_config(remotes, domain, seed=seed, ca=ca) + local
    return EmbeddedNats(port, config_extra=extra, extra_args=(*kw.pop("extra_args", ()), *NO_JETSTREAM), **kw)


async def until_linked(nc: Client, timeout: float = 10.0, stream: str | None = None) -> None:
    """Wait until the edge's JetStream answers through the leaf `nc` is connected to (the link is up and the
    edge knows the leaf's interest); raise the last error after `timeout` seconds. `stream`: ask for that
    stream's info instead of the account's (which a secured device may not read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            js = nc.jetstream(timeout=0.5)
            await (js.stream_info(stream) if stream is not None else js.account_info())
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


__all__ = ["EDGE_DOMAIN", "NO_JETSTREAM", "edge_config", "leaf_config", "leaf_server", "leaf_url",
           "leafnode_port", "until_linked"]
