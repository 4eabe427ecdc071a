"""draftwire on a real 3-node NATS cluster on loopback (`draftwire up --nats-cluster 3`).

Every stream and bucket gets min(3, cluster size) replicas, and SIGKILLing the node that holds every JetStream
leader and the scheduler's connection, while greedy prompts are in flight, loses no prompt and no result: each
completes once, with the tokens of a fault-free run. The services run as processes (the `up` code), on the tiny
random Llama; the observing client sits on a node that survives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.request
from collections import Counter, defaultdict

import msgpack
import nats.errors
import nats.js.errors
import pytest
import pytest_asyncio
from nats.js.api import Header

from draftwire.services.cli.stack import start_stack
from draftwire.shared.core.subject_names import (
    DELIVERED_BUCKET,
    DONE_STREAM,
    JOBS_STREAM,
    ROOT,
    SUBMIT_STREAM,
)
from draftwire.shared.io import bus, credentials
from draftwire.shared.io.bus import JOBS_CONSUMER, SUBJECTS, SUBMIT_CONSUMER, flush
from draftwire.shared.io.nats_server import EmbeddedNats, NatsCluster
from draftwire.shared.io.tls import client_context, make_dev_certs, server_tls_block

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = [f"node loss {i}:" for i in range(6)]
NEW_TOKENS = 160  # long enough that every prompt is mid-generation when the node dies
STREAMS = (JOBS_STREAM, SUBMIT_STREAM, DONE_STREAM, f"KV_{DELIVERED_BUCKET}")


def _replicas_of(info) -> int:
    return 1 + len(info.cluster.replicas or []) if info.cluster is not None else 1


@pytest.mark.parametrize("size", [1, 2, 3])
async def test_every_stream_and_bucket_gets_min_3_cluster_size_replicas(tmp_path, size):
    """One server: 1 replica (it refuses more); a cluster of 2: 2; of 3: 3, consumers included."""
    server = EmbeddedNats(store_dir=tmp_path / "js") if size == 1 else NatsCluster(size, store_dir=tmp_path)
    async with server:
        nc = await bus.connect(server.url, "replicas-test")
        try:
            js = nc.jetstream()
            await bus.ensure_jobs_stream(js)
            await bus.ensure_submit_stream(js)
            await bus.ensure_done_stream(js)
            await bus.ensure_delivered_bucket(js, ttl=60.0)
            await bus.vocab_store(js, create=True)
            infos = {i.config.name: i for i in await js.streams_info()}
            assert set(infos) == {*STREAMS, f"OBJ_{bus.VOCAB_BUCKET}"}
            for name, info in infos.items():
                assert info.config.num_replicas == size and _replicas_of(info) == size, name
            for stream, consumer in ((JOBS_STREAM, JOBS_CONSUMER), (SUBMIT_STREAM, SUBMIT_CONSUMER)):
                assert _replicas_of(await js.consumer_info(stream, consumer)) == size, consumer
            await bus.ensure_jobs_stream(js)  # again, as every service start does: still the same
            assert (await js.stream_info(JOBS_STREAM)).config.num_replicas == size
        finally:
            await nc.close()


async def test_a_client_given_every_node_connects_while_the_first_is_down_and_moves_when_its_own_dies(tmp_path):
    """`--nats URL1,URL2,URL3`: any live node will do to start, and the client's subscriptions follow it to
    another node within moments of its own node's death (measured: the reconnect latency)."""
    async with NatsCluster(3, store_dir=tmp_path) as cluster:
        cluster.kill(0)
        responder = await bus.connect(cluster.url, "list-responder", initial_timeout=3)
        asker = await bus.connect(cluster.url, "list-asker", initial_timeout=3)
        try:
            async def echo(msg) -> None:
                await msg.respond(msg.data)

            await responder.subscribe("t.echo", cb=echo)
            await flush(responder)
            await _echoed(asker, b"1", within=2)  # the interest reaches the other nodes over the routes
            own = next(i for i, u in enumerate(cluster.urls) if u.endswith(f":{responder.connected_url.port}"))
            reconnected = asyncio.Event()
            responder._reconnected_cb = _set(reconnected)
            t0 = time.monotonic()
            cluster.kill(own)
            await asyncio.wait_for(reconnected.wait(), 5)
            reconnect_s = time.monotonic() - t0
            await _echoed(asker, b"2", within=5)
            print(f"\nreconnected to another node {reconnect_s * 1000:.0f} ms after its own was killed; "
                  f"served again after {(time.monotonic() - t0) * 1000:.0f} ms")
        finally:
            await responder.close()
            await asker.close()


async def _echoed(nc, payload: bytes, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            assert (await nc.request("t.echo", payload, timeout=0.5)).data == payload
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            assert time.monotonic() < deadline, "no echo: the subscription did not follow its client"
            await asyncio.sleep(0.05)


def _set(event: asyncio.Event):
    async def cb() -> None:
        event.set()

    return cb


async def test_a_secured_cluster_holds_every_node_to_the_identities_and_tls_and_admits_new_ones(tmp_path):
    """`up --secure DIR --nats-cluster 3`: each node gets the single server's authorization and TLS, so an
    identity signs in over TLS at any node and nobody signs in anonymously; a new identity is admitted on
    every node by a reload, as `draftwire auth add-client` does on a running stack."""
    secure = credentials.ensure_credentials(tmp_path / "secure")
    block = server_tls_block(make_dev_certs(secure / "tls"))
    tls = client_context(secure / "tls" / "ca.pem")
    async with NatsCluster(3, store_dir=tmp_path / "js",
                           config_extra=credentials.server_authorization(secure) + block) as cluster:
        admin = await bus.connect(cluster.url, "admin", creds=credentials.identity_file(secure, "admin"), tls=tls)
        try:
            await bus.ensure_jobs_stream(admin.jetstream())
            assert (await admin.jetstream().stream_info(JOBS_STREAM)).config.num_replicas == 3
        finally:
            await admin.close()
        path = credentials.add_identity(secure, "alice", "client")
        cluster.reload(credentials.server_authorization(secure) + block)
        for url in cluster.urls:
            with pytest.raises(ConnectionError, match="Authorization Violation"):
                await bus.connect(url, "anonymous", tls=tls, initial_timeout=1)
            deadline = time.monotonic() + 5
            while True:  # the reload is a signal: each node applies it a moment later
                try:
                    await (await bus.connect(url, "alice", creds=path, tls=tls, initial_timeout=2)).close()
                    break
                except ConnectionError:
                    assert time.monotonic() < deadline, f"{url} did not admit the new identity"
                    await asyncio.sleep(0.1)


def _stack_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(
        nats=None, nats_port=0, nats_cluster=3, telemetry_port=0, draft_model="tiny-random", draft_dtype="fp32",
        target_model="tiny-random", target_dtype="fp32", mode="tkslt", gamma=4, k=8, **kw,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    st = await start_stack(_stack_args(), quiet=not os.environ.get("DW_VERBOSE"), store_dir=str(tmp_path_factory.mktemp("cluster")),
                           progress=False)
    try:
        yield st
    finally:
        await st.stop()


@pytest.mark.slow
async def test_up_nats_cluster_gives_every_service_the_node_list_and_3_replicas(stack):
    cluster = stack.nats
    assert isinstance(cluster, NatsCluster) and stack.url == ",".join(cluster.urls) and len(cluster.urls) == 3
    nc = await bus.connect(stack.url, "replicas-check")
    try:
        infos = {i.config.name: i for i in await nc.jetstream().streams_info()}
        assert set(infos) >= set(STREAMS)  # what `up` and the services made (and the verifier's vocab store, if any)
        for name, info in infos.items():
            assert info.config.num_replicas == 3 and _replicas_of(info) == 3, name
    finally:
        await nc.close()


def _connections(cluster: NatsCluster, i: int) -> list[str]:
    url = f"http://{cluster.host}:{cluster.monitor_ports[i]}/connz?limit=1024"
    with urllib.request.urlopen(url, timeout=2) as r:
        return [c.get("name", "") for c in json.loads(r.read())["connections"]]


async def _gather_leaders(cluster: NatsCluster, nc, node: int) -> int:
    """Move every stream's and the job consumer's leader to `node` (where they can move), and return the node
    that then leads the jobs stream: `node`, unless the stream has no copy there to lead from."""
    js, name = nc.jetstream(), cluster.server_name(node)
    body = json.dumps({"placement": {"preferred": name}}).encode()
    for stream in STREAMS:
        if (await js.stream_info(stream)).cluster.leader != name:
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5)
    if (await js.consumer_info(JOBS_STREAM, JOBS_CONSUMER)).cluster.leader != name:
        await nc.request(f"$JS.API.CONSUMER.LEADER.STEPDOWN.{JOBS_STREAM}.{JOBS_CONSUMER}", body, timeout=5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        try:  # JetStream answers 503 while a group elects its new leader
            leaders = {s: (await js.stream_info(s)).cluster.leader for s in STREAMS}
            leaders["consumer"] = (await js.consumer_info(JOBS_STREAM, JOBS_CONSUMER)).cluster.leader
        except (nats.js.errors.APIError, TimeoutError):
            continue
        if set(leaders.values()) == {name}:
            break
    leader = (await js.stream_info(JOBS_STREAM)).cluster.leader
    return next(i for i in range(cluster.size) if cluster.server_name(i) == leader)


class Collector:
    """Sends prompts and counts every reply (on each prompt's own reply subject) and every `results.<id>` copy.

    Request/reply prompts are sent as a client does; `submit` ones fire-and-forget on the JetStream path,
    re-published (same `Nats-Msg-Id`) until a PubAck says the stream holds them."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.replies: Counter = Counter()
        self.results: dict[str, dict] = {}  # by id: the reply, else (fire-and-forget) the results.<id> copy
        self.arrived: dict[str, float] = {}  # when each result came (time.monotonic())
        self.rounds: dict[str, list[float]] = defaultdict(list)  # when each round of a request was verified
        self.no_responders = 0
        self.submit_tries = 0

    async def start(self) -> None:
        async def on_reply(msg) -> None:
            rid = msg.subject.rsplit(".", 1)[1]
            if (msg.headers or {}).get(Header.STATUS) == "503":  # no scheduler subscribed at that instant: a
                self.no_responders += 1  # refusal, at once, before anything was stored; a client sends it again
                await asyncio.sleep(0.1)
                await self.send_one(rid)
                return
            self.replies[rid] += 1
            self._got(rid, msg)

        async def on_result(msg) -> None:
            rid = msg.subject.rsplit(".", 1)[1]
            self.replies[f"results.{rid}"] += 1
            if rid.startswith("submit-"):
                self._got(rid, msg)

        async def on_round(msg) -> None:
            self.rounds[msgpack.unpackb(msg.data)["request_id"]].append(time.monotonic())

        await self.nc.subscribe("_INBOX.nodeloss.*", cb=on_reply)
        await self.nc.subscribe(f"{ROOT}.results.*", cb=on_result)
        await self.nc.subscribe(SUBJECTS.events_round, cb=on_round)
        await flush(self.nc)

    def _got(self, rid: str, msg) -> None:
        self.arrived[rid] = time.monotonic()
        self.results[rid] = json.loads(msg.data)

    @staticmethod
    def body(rid: str) -> bytes:
        prompt = PROMPTS[int(rid.rsplit("-", 1)[1])]
        return json.dumps({"id": rid, "prompt": prompt, "max_new_tokens": NEW_TOKENS,
                           "min_new_tokens": NEW_TOKENS}).encode()

    async def send(self, tag: str, n: int = len(PROMPTS)) -> list[str]:
        ids = [f"{tag}-{i}" for i in range(n)]
        for rid in ids:
            await self.send_one(rid)
        return ids

    async def send_one(self, rid: str) -> None:
        await self.nc.publish(SUBJECTS.prompts, self.body(rid), reply=f"_INBOX.nodeloss.{rid}",
                              headers={})  # headers on: a request nobody hears gets NATS's 503 at once

    async def submit(self, n: int) -> list[str]:
        ids = [f"submit-{i}" for i in range(n)]
        js = self.nc.jetstream(timeout=1.0)
        for rid in ids:
            deadline = time.monotonic() + 30
            while True:
                self.submit_tries += 1
                try:
                    await js.publish(SUBJECTS.submit, self.body(rid), headers={"Nats-Msg-Id": rid})
                    break
                except (nats.errors.Error, TimeoutError):  # no stream leader yet: the same message again
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        return ids

    async def wait(self, ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not set(ids) <= set(self.results) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_killing_the_node_with_the_scheduler_and_every_leader_loses_no_prompt_and_no_result(stack):
    """The node holding the scheduler's connection and every JetStream leader (the streams, the job consumer) is
    SIGKILLed while six greedy prompts run; two fire-and-forget prompts are submitted at once and two request/
    reply prompts a moment later, while the cluster elects new leaders. Every one completes with a fault-free
    run's tokens, and every reply subject gets exactly one reply.

    (A request published in the very instant of the crash can die in the dead node before any scheduler has it,
    like any core NATS message in flight: its client sees a timeout. Durable from the moment a PubAck or a
    scheduler's store says so: that is what is checked here.)"""
    cluster: NatsCluster = stack.nats
    scheduler_node = next(i for i in range(cluster.size)
                          if any(n.startswith("draftwire-scheduler-") for n in _connections(cluster, i)))
    admin = await bus.connect(stack.url, "node-loss-admin")
    try:
        victim = await _gather_leaders(cluster, admin, scheduler_node)
    finally:
        await admin.close()
    on_victim = sorted(n.split("-")[1] for n in _connections(cluster, victim) if n.startswith("draftwire-"))
    survivors = [u for i, u in enumerate(cluster.urls) if i != victim]
    nc = await bus.connect(",".join(survivors), "node-loss-client")  # the observer must not be on the victim
    c = Collector(nc)
    try:
        await c.start()
        t0 = time.monotonic()
        calm = await c.send("calm")
        await c.wait(calm, 30)
        calm_s = time.monotonic() - t0
        assert all("error" not in c.results.get(r, {"error": "none"}) for r in calm), c.results
        t0 = time.monotonic()
        storm = await c.send("storm")
        deadline = time.monotonic() + 20
        while any(len(c.rounds[r]) < 3 for r in storm) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        kill = time.monotonic()
        cluster.kill(victim)
        submitted = await c.submit(2)
        await asyncio.sleep(max(0.0, kill + 0.2 - time.monotonic()))
        late = await c.send("late", 2)
        await c.wait(storm + submitted + late, 45)
        storm_s = time.monotonic() - t0
        await asyncio.sleep(1.0)  # a duplicate reply would come now
    finally:
        await nc.close()
    missing = [r for r in storm + submitted + late if r not in c.results]
    assert not missing, f"no result for {missing} in 45 s after the kill"
    after = [[t for t in c.rounds[r] if t > kill] for r in storm]
    assert all(after), "a prompt had finished before the kill"  # so every one was in flight
    print(f"\nvictim {cluster.server_name(victim)} (services on it: {on_victim}); fault-free {calm_s:.1f}s, "
          f"with the kill {storm_s:.1f}s; longest stall of a session's rounds after the kill "
          f"{max(a[0] - kill for a in after):.2f}s; results after the last round "
          f"{max(c.arrived[r] - c.rounds[r][-1] for r in calm):.2f}s fault-free, "
          f"{max(c.arrived[r] - c.rounds[r][-1] for r in storm):.2f}s in flight at the kill; kill to the last "
          f"result {max(c.arrived[r] for r in storm + submitted + late) - kill:.2f}s; {c.no_responders} "
          f"request(s) resent after 'no responders', {c.submit_tries} publishes for {len(submitted)} submissions")
    for rid in storm + submitted + late:
        got, want = c.results[rid], c.results[f"calm-{rid.rsplit('-', 1)[1]}"]
        assert "error" not in got, (rid, got)
        assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == NEW_TOKENS, rid
    expected = Counter({f"results.{r}": 1 for r in calm + storm + submitted + late})
    expected.update({r: 1 for r in calm + storm + late})  # fire-and-forget has no reply subject
    assert c.replies == expected, c.replies
    await cluster.restart(victim)  # and it rejoins
