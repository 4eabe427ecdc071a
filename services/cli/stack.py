"""`draftwire up`: an embedded nats-server or a local cluster of them (unless `--nats` names running ones) and
the services as child processes.

The children are started exactly as compose starts them (`python -m draftwire.services.<name>` configured by flags),
so `up` is the compose file without Docker. Ready means every service printed its ready line; Ctrl-C or
SIGTERM stops the children first, then NATS, and Linux's parent-death signal covers a `kill -9` of `up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from draftwire.shared.core.link_profile import PROFILES, LinkProfile, parse_link
from draftwire.shared.io import credentials
from draftwire.shared.io.bus import connect, ensure_done_stream, ensure_submit_stream
from draftwire.shared.io.link_emulator import LinkProxy
from draftwire.shared.io.nats_leaf import (
    EDGE_DOMAIN,
    edge_config,
    leaf_server,
    leaf_url,
    leafnode_port,
    until_linked,
)
from draftwire.shared.io.nats_server import (
    EmbeddedNats,
    NatsCluster,
    _die_with_parent,
    is_reachable,
    split_urls,
)
from draftwire.shared.io.service_shell import READY_PREFIX
from draftwire.shared.io.tls import client_context, make_dev_certs, server_tls_block
from draftwire.shared.models.cache import cache_root

SERVICES = ("telemetry", "verifier", "draft", "scheduler", "gateway")
ROLE = {"telemetry": "telemetry", "verifier": "edge", "draft": "device", "scheduler": "scheduler",
        "gateway": "gateway"}  # the identity each runs as when secured (the gateway is a client: its own tenant)
READY_TIMEOUT_S = 600.0  # first start may pull and convert models


@dataclass
class Stack:
    """A running stack; `url` is where clients connect (every node's URL, comma-separated, on a cluster).

    `procs` is keyed by replica: the first of each service by its name (`verifier`), further ones
    `verifier-2`, `verifier-3`, ...; `restart(key)` kills one (SIGKILL by default, as a crash would) and starts
    it again with the same flags, which is what the fault benchmark and the failover tests do.
    """

    url: str
    nats: EmbeddedNats | NatsCluster | None = None
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    telemetry_url: str | None = None
    gateway_url: str | None = None  # the OpenAI-compatible API's base URL
    link: LinkProxy | None = None  # between the device side (draft) and NATS, when --link is given
    leaf: EmbeddedNats | None = None  # the device site's own server (`--leaf`), where the drafts connect
    leaf_links: list[LinkProxy] = field(default_factory=list)  # its links to the edge, one per edge node
    quiet: bool = False
    secure_dir: str | None = None  # the identities' directory when secured (`--secure DIR`)
    tls_block: str = ""  # the server's `tls {}` config when secured (after the authorization block)
    _commands: dict[str, tuple[list[str], dict]] = field(default_factory=dict)
    _drains: list[asyncio.Task] = field(default_factory=list)

    async def spawn(self, key: str, argv: list[str] | None = None, env: dict | None = None) -> bool:
        """Start replica `key` (again) and wait for its ready line; False if it exited first."""
        if argv is not None:
            self._commands[key] = (argv, env or {})
        argv, env = self._commands[key]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if self.quiet else None, env=env,
            preexec_fn=_die_with_parent,
        )
        self.procs[key] = proc
        return await _wait_ready(proc, self, key, self.quiet)

    async def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[key]
        if proc.returncode is None:
            proc.send_signal(sig)
        await proc.wait()

    async def restart(self, key: str, sig: int = signal.SIGKILL) -> bool:
        await self.kill(key, sig)
        return await self.spawn(key)

    def leaf_outage(self, seconds: float) -> None:
        """Cut the device site's link to the edge for `seconds` (every edge node's), as a failed uplink."""
        if not self.leaf_links:
            raise RuntimeError("no leaf link to cut: start the stack with --leaf")
        for link in self.leaf_links:
            link.outage(seconds)

    async def stop(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                print(f"draftwire: {name} did not stop in 15s; killing it", file=sys.stderr)
                proc.kill()
                await proc.wait()
        for task in self._drains:
            task.cancel()
        if self.link is not None:
            await self.link.stop()
        if self.leaf is not None:
            await self.leaf.stop()
        for link in self.leaf_links:
            await link.stop()
        if self.nats is not None:
            await self.nats.stop()

    @property
    def client_creds(self) -> str | None:
        """The first client's credentials when secured (what `demo` and the printed example use)."""
        return str(credentials.identity_file(self.secure_dir, credentials.FIRST_CLIENT)) if self.secure_dir else None

    @property
    def tls_ca(self) -> Path | None:
        return Path(self.secure_dir) / "tls" / "ca.pem" if self.secure_dir else None

    def client_tls(self):
        """The ssl context a client of this stack needs (None when not secured)."""
        return client_context(self.tls_ca) if self.secure_dir else None

    def admit_new_identities(self) -> bool:
        """Reload the embedded server when `auth.conf` changed (`draftwire auth add-client`); True if it did."""
        if self.secure_dir is None or self.nats is None:
            return False
        current = credentials.server_authorization(self.secure_dir) + self.tls_block
        if current == self.nats.config_extra:
            return False
        self.nats.reload(current)
        return True

    def dead(self) -> list[str]:
        return [f"{n} (exit {p.returncode})" for n, p in self.procs.items() if p.returncode is not None]


def replica_keys(name: str, count: int) -> list[str]:
    return [name if i == 1 else f"{name}-{i}" for i in range(1, count + 1)]


def service_args(name: str, args) -> list[str]:
    """Each service's own flags, taken from the shared model/sampling flags of `up`."""
    # device and edge get a core each, as on real hardware (and so they do not oversubscribe a small machine)
    threads = ["--torch-threads", str(getattr(args, "torch_threads", 1))]
    if name in ("verifier", "draft"):
        role = "target" if name == "verifier" else "draft"
        model = [f"--{role}-model", getattr(args, f"{role}_model"), f"--{role}-dtype", getattr(args, f"{role}_dtype")]
        # callers that build their own args without a device leave it to the service's DRAFTWIRE_<ROLE>_DEVICE
        device = getattr(args, f"{role}_device", None)
        return [*model, *([f"--{role}-device", device] if device else []), *threads]
    if name == "scheduler":
        return ["--default-mode", args.mode, "--default-gamma", str(args.gamma), "--default-k", str(args.k),
                "--default-policy", getattr(args, "policy", "fixed"),
                "--default-pipeline" if getattr(args, "pipeline", False) else "--no-default-pipeline"]
    if name == "telemetry":
        return ["--http-port", str(args.telemetry_port)]
    if name == "gateway":  # callers that build their own args get a free port
        return ["--http-port", str(getattr(args, "gateway_port", 0))]
    raise ValueError(name)


def replicas(name: str, args) -> int:
    """How many instances of a service `up` starts (`--verifiers`, `--drafts`, `--schedulers`; telemetry 1)."""
    flag = {"verifier": "verifiers", "draft": "drafts", "scheduler": "schedulers"}.get(name)
    count = getattr(args, flag, 1) if flag else 1
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"--{flag} must be >= 1, got {count!r}")
    return count


def jetstream_store(port: int | None, cluster: int = 0) -> str | None:
    """Where an embedded server keeps JetStream state: per port, so prompts queued while `up` was down are
    served next time. A server on a random port (demo, bench, loadtest, faults) gets None (a temp dir removed
    on stop): runs sharing one directory would run each other's leftover jobs, and refuse a later run's
    request ids as `duplicate_id` while those are still stored."""
    if not port:
        return None
    return os.path.join(cache_root(), "nats", f"cluster{cluster}-{port}" if cluster else str(port))


async def start_stack(args, *, quiet: bool = False, store_dir: str | None = None, env: dict | None = None,
                      progress: bool = True) -> Stack:
    """Bring everything up and return once every service is ready (or raise with the failing one's log).

    `quiet` hides the services' logs; `progress` shows the model phases on stderr (the pull's download,
    extraction, checksum and conversion here, then one line while the services load the weights).
    """
    from draftwire.shared.models.progress import status
    from draftwire.shared.models.store import resolve

    cluster = getattr(args, "nats_cluster", 0) or 0  # nodes of a local NATS cluster; 0: one server
    if cluster and args.nats is not None:
        raise ValueError("--nats-cluster starts its own servers: leave out --nats (or --nats-cluster)")
    leaf = bool(getattr(args, "leaf", False))  # the drafts on a device site's leaf server
    if getattr(args, "link", None) is not None and not leaf and (cluster or (args.nats is not None and len(split_urls(args.nats)) > 1)):
        raise ValueError("--link on a cluster: add --leaf (an emulator then sits on the leaf's link to every node; "
                         "a draft's own connection through one emulator would depend on a single node)")
    if leaf and (args.nats is not None or getattr(args, "secure", None)):
        raise ValueError("--leaf starts the edge's servers and the site's unsecured: leave out --nats and --secure "
                         "(a secured site: deploy/leaf/, docs/scale_out.md)")
    for source in {args.draft_model, args.target_model}:  # pull once here, not racing in two children
        await asyncio.to_thread(resolve, source, progress)
    nats = None
    url = args.nats
    secure = getattr(args, "secure", None)
    authorization = tls_block = ""
    if secure:  # every identity's seed file (created once, then reused) and the server config admitting them,
        # and TLS with development certificates in DIR/tls (reused while valid)
        secure = str(credentials.ensure_credentials(secure))
        tls_files = make_dev_certs(Path(secure) / "tls")
        tls_block = server_tls_block(tls_files)
        authorization = credentials.server_authorization(secure) + tls_block
    if url is not None:
        servers = split_urls(url)
        if not any(await asyncio.gather(*(is_reachable(u) for u in servers))):
            raise ConnectionError(f"no NATS server reachable at {url} (leave out --nats to embed one)")
    else:
        port = args.nats_port or None
        store = store_dir or jetstream_store(port, cluster)
        nats = (NatsCluster(cluster, ports=[port + i for i in range(cluster)] if port else None, store_dir=store,
                            config_extra=authorization, leaf_domain=EDGE_DOMAIN if leaf else None) if cluster else
                EmbeddedNats(port=port, store_dir=store, config_extra=authorization + (edge_config() if leaf else "")))
        await nats.start()
        url = nats.url
    stack = Stack(url=url, nats=nats, quiet=quiet, secure_dir=secure or None, tls_block=tls_block)
    admin = {"creds": str(credentials.identity_file(secure, "admin")), "tls": stack.client_tls()} if secure else {}
    try:
        if leaf:  # the device site: its server's remotes are link emulators, one to each edge node
            profile = getattr(args, "link", None) or PROFILES["lan"]
            ports = nats.leaf_ports if cluster else [leafnode_port(nats)]
            for port in ports:
                stack.leaf_links.append(await LinkProxy("127.0.0.1", port, profile).start())
            stack.leaf = await leaf_server([leaf_url("127.0.0.1", link.port) for link in stack.leaf_links]).start()
            probe = await connect(stack.leaf.url, "draftwire-up-leaf")
            try:
                await until_linked(probe, 30.0)  # a busy machine may take seconds to route the link
            finally:
                await probe.close()
        elif (link := getattr(args, "link", None)) is not None:
            target = urlparse(split_urls(url)[0])  # a proxy has one upstream: the first server
            profile = link if isinstance(link, LinkProfile) else parse_link(link)
            stack.link = await LinkProxy(target.hostname, target.port or 4222, profile).start()
        nc = await connect(url, "draftwire-up", **admin)
        try:
            await ensure_submit_stream(nc.jetstream(), create_consumer=False)  # keep submissions before the scheduler
            await ensure_done_stream(nc.jetstream())  # a secured draft may not create it
        finally:
            await nc.close()
        env = {**os.environ, **(env or {}), "DRAFTWIRE_NATS_URL": url}
        ready: dict[str, asyncio.Future] = {}
        for name in SERVICES:
            service_url = url
            if name == "draft" and (stack.leaf is not None or stack.link is not None):
                service_url = stack.leaf.url if stack.leaf is not None else stack.link.url
            argv = [sys.executable, "-m", f"draftwire.services.{name}", "--nats", service_url, *service_args(name, args)]
            for key in replica_keys(name, replicas(name, args)):
                own = {**env, "DRAFTWIRE_CREDS": str(credentials.identity_file(secure, ROLE[name])),
                       "DRAFTWIRE_TLS_CA": str(stack.tls_ca)} if secure else env
                ready[key] = asyncio.ensure_future(stack.spawn(key, argv, own))
        status("load", f"{args.draft_model} as {args.draft_dtype} (draft) and {args.target_model} as "
                       f"{args.target_dtype} (verifier), each in its service's process", progress)
        loading = time.perf_counter()
        done, _ = await asyncio.wait(ready.values(), timeout=READY_TIMEOUT_S)
        failed = [n for n, f in ready.items() if f not in done or not f.result()]
        if failed:
            raise RuntimeError(f"services did not become ready: {', '.join(failed)}; {', '.join(stack.dead())}")
        status("load", f"every service ready in {time.perf_counter() - loading:.1f} s", progress)
    except BaseException:
        await stack.stop()
        raise
    return stack


async def _wait_ready(proc: asyncio.subprocess.Process, stack: Stack, name: str, quiet: bool) -> bool:
    """Read the child's stdout until its ready line; keep draining it afterwards so it never blocks."""
    while line := (await proc.stdout.readline()).decode(errors="replace"):
        if line.startswith(READY_PREFIX):
            if name in ("telemetry", "gateway") and "http=" in line:
                setattr(stack, f"{name}_url", line.rsplit("http=", 1)[1].split()[0])
            stack._drains.append(asyncio.create_task(_drain(proc, quiet)))
            return True
        if not quiet:
            sys.stdout.write(line)
    return False


async def _drain(proc: asyncio.subprocess.Process, quiet: bool) -> None:
    while line := await proc.stdout.readline():
        if not quiet:
            sys.stdout.write(line.decode(errors="replace"))


async def run_up(args) -> int:
    stack = await start_stack(args)
    servers = split_urls(stack.url)
    where = f"a cluster of {len(servers)} nodes at {stack.url}" if len(servers) > 1 else stack.url
    print(f"draftwire: NATS at {where}", flush=True)
    if stack.leaf is not None:
        print(f"draftwire: draft services on a device site's leaf server at {stack.leaf.url}, linked to every "
              f"edge node ({stack.leaf_links[0].profile.describe()})", flush=True)
    if stack.link is not None:
        print(f"draftwire: draft service behind an emulated link ({stack.link.profile.describe()}) "
              f"at {stack.link.url}", flush=True)
    if stack.telemetry_url:
        print(f"draftwire: telemetry at {stack.telemetry_url}/metrics", flush=True)
    if stack.gateway_url:
        print(f"draftwire: OpenAI-compatible API at {stack.gateway_url} (e.g. OpenAI(base_url=\"{stack.gateway_url}\", "
              "api_key=\"-\"))", flush=True)
    if stack.secure_dir:
        client = stack.client_creds
        print(f"draftwire: secured: every service has its own identity in {stack.secure_dir}; a client connects "
              f"with its credentials, e.g. `draftwire generate --creds {client} --tls-ca {stack.tls_ca} "
              f"--nats {stack.url} \"Hello\"`, "
              f"and publishes to draftwire.prompts.{credentials.FIRST_CLIENT}; add a tenant with "
              f"`draftwire auth add-client NAME --secure {stack.secure_dir}`", flush=True)
    else:
        print("draftwire: WARNING: INSECURE: NATS has no authentication; anyone who reaches "
              f"{stack.url} can read every prompt and forge any reply (run `draftwire up --secure DIR`)",
              file=sys.stderr, flush=True)
    print(f"draftwire: ready ({', '.join(SERVICES)}); publish prompts to draftwire.prompts"
          f"{'.<tenant>' if stack.secure_dir else ''}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if stack.admit_new_identities():
                print("draftwire: identities changed; NATS reloaded its authorization", flush=True)
            if dead := stack.dead():
                print(f"draftwire: error: service exited: {', '.join(dead)}; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        print("draftwire: stopping", file=sys.stderr, flush=True)
        await stack.stop()
