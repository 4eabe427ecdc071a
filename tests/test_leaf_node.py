"""A device site on a leaf node: the draft service reaches the edge only through its own server's leaf link.

The edge server (JetStream in domain `edge`, a leafnode listener) carries the verifier and the scheduler; the
leaf server (no JetStream of its own) carries the draft service alone; the link emulator sits on the leaf
link, shaped as a cell-edge radio link (shared/io/nats_leaf.py). The services run in this process with the
tiny-random pair. Covers: a greedy generation through the leaf equals the in-process engine; the same
generation with the link cut for 5 s mid-way (every connection dropped, redials refused) completes with the
same tokens; the secured leaf link (TLS, signed in as the device identity) reaches the edge's JetStream
(results stream, tokenizer store) and the verifiers, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path

import msgpack
import pytest
import pytest_asyncio

from draftwire.services.draft import service as draft_service
from draftwire.services.verifier import service as verifier_service
from draftwire.shared.core.link_profile import PROFILES
from draftwire.shared.core.params import SamplingParams, SpecParams
from draftwire.shared.core.speculation import LocalEngine
from draftwire.shared.io import bus, credentials
from draftwire.shared.io.bus import SUBJECTS, connect, flush
from draftwire.shared.io.link_emulator import LinkProxy
from draftwire.shared.io.nats_leaf import (
    NO_JETSTREAM,
    edge_config,
    leaf_server,
    leaf_url,
    leafnode_port,
    until_linked,
)
from draftwire.shared.io.nats_server import EmbeddedNats
from draftwire.shared.io.tls import client_context, make_dev_certs, server_tls_block
from draftwire.shared.models.runtime import load_model
from tests.in_process import running, scheduler

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "def f(x):"
NEW_TOKENS = 60  # 12 rounds of gamma 4 (the draft is the target: every token is accepted)
REQUEST = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "mode": "tkslt",
           "gamma": 4, "k": 8}
OUTAGE_S = 5.0
CUT_AFTER_ROUNDS = 3
LINKED_S = 10.0  # for the leaf link to come up (it is up within milliseconds on loopback)
DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "leaf"


async def _echo(reader, writer) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _closed(reader) -> bool:
    """True when the peer has closed or reset the connection (within a second)."""
    try:
        return await asyncio.wait_for(reader.read(1024), 1.0) == b""
    except ConnectionError:
        return True


async def test_an_outage_cuts_open_connections_and_refuses_new_ones_until_it_ends():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    async with server, LinkProxy("127.0.0.1", server.sockets[0].getsockname()[1], PROFILES["lan"]) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        back = link.outage(0.5)
        assert link.down and await _closed(reader)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)  # refused while it lasts
        assert await _closed(reader)
        writer.close()
        await asyncio.sleep(back - asyncio.get_running_loop().time())
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"again")
        assert not link.down and await reader.readexactly(5) == b"again"
        writer.close()
        assert (link.cuts, link.refused) == (1, 1)


async def test_a_draft_started_while_its_leaf_link_is_down_waits_for_the_edge(tmp_path):
    """The device site comes up before its link to the edge: the draft waits for the edge's JetStream (where
    its results go) instead of exiting, and is ready once the link is."""
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        enter = stack.enter_async_context
        edge = await enter(EmbeddedNats(store_dir=tmp_path / "js", config_extra=edge_config()))
        link = await enter(LinkProxy("127.0.0.1", leafnode_port(edge), PROFILES["lan"]))
        back = link.outage(3.0)
        leaf = await enter(leaf_server([leaf_url("127.0.0.1", link.port)]))
        assert link.refused  # the leaf dialled the edge and was refused
        await enter(running(draft_service, leaf.url, "d1", "--draft-model", "tiny-random", "--draft-dtype", "fp32"))
        assert loop.time() >= back  # not ready before the edge answered
        probe = await connect(edge.url, name="probe")
        stack.push_async_callback(probe.close)
        assert (await probe.jetstream().stream_info(bus.DONE_STREAM)).config.name == bus.DONE_STREAM


class Site:
    """The edge with its services, the emulated link, and the device site's leaf server with the draft."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()

    async def start(self, store: Path) -> Site:
        enter = self.stack.enter_async_context
        self.edge = await enter(EmbeddedNats(store_dir=store, config_extra=edge_config()))
        await enter(running(verifier_service, self.edge.url, "v1", "--target-model", "tiny-random",
                               "--target-dtype", "fp32"))
        await enter(scheduler(self.edge.url))
        self.link = await enter(LinkProxy("127.0.0.1", leafnode_port(self.edge), PROFILES["cell-edge"]))
        self.leaf = await enter(leaf_server([leaf_url("127.0.0.1", self.link.port)]))
        probe = await connect(self.leaf.url, name="probe")
        try:
            await until_linked(probe, LINKED_S)
        finally:
            await probe.close()
        await enter(running(draft_service, self.leaf.url, "d1", "--draft-model", "tiny-random",
                               "--draft-dtype", "fp32"))
        self.client = await connect(self.edge.url, name="client")
        self.stack.push_async_callback(self.client.close)
        return self

    async def generate(self, request_id: str, on_round=None) -> tuple[dict, float]:
        """One request from a client at the edge; calls `on_round(n)` at every round event of it."""
        rounds = 0

        async def count(msg) -> None:
            nonlocal rounds
            if msgpack.unpackb(msg.data).get("request_id") == request_id:
                rounds += 1
                if on_round is not None:
                    on_round(rounds)

        sub = await self.client.subscribe(SUBJECTS.events_round, cb=count)
        await flush(self.client)
        t0 = time.monotonic()
        try:
            body = json.dumps({**REQUEST, "id": request_id}).encode()
            msg = await self.client.request(SUBJECTS.prompts, body, timeout=120)
        finally:
            await sub.unsubscribe()
        return json.loads(msg.data), time.monotonic() - t0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def site(tmp_path_factory):
    s = Site()
    try:
        yield await s.start(tmp_path_factory.mktemp("js"))
    finally:
        await s.stack.aclose()


@pytest.fixture(scope="module")
def reference() -> list[int]:
    model = load_model("tiny-random", "fp32", progress=False)
    spec = SpecParams(mode="tkslt", gamma=4, k=8)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    return LocalEngine(model, model).generate(model.encode(PROMPT), params, spec).token_ids


async def test_a_draft_behind_a_leaf_node_generates_what_the_engine_does(site, reference):
    result, _ = await site.generate("leaf-1")
    assert "error" not in result, result
    assert result["token_ids"] == reference
    assert site.link.bytes_up > 0 and site.link.bytes_down > 0  # the rounds crossed the emulated link


async def test_a_5s_leaf_link_outage_mid_generation_is_survived_with_identical_output(site, reference):
    loop = asyncio.get_running_loop()
    cut: dict[str, float] = {}
    after: list[float] = []  # loop times of the rounds that came after the link was back

    def on_round(n: int) -> None:
        if n == CUT_AFTER_ROUNDS and not cut:
            cut["at"] = loop.time()
            cut["back"] = site.link.outage(OUTAGE_S)
        elif cut and loop.time() >= cut["back"]:
            after.append(loop.time())

    result, wall = await site.generate("leaf-2", on_round)
    done = loop.time()
    assert "error" not in result, result
    assert cut and site.link.cuts >= 1, "the link was never cut"
    assert result["token_ids"] == reference  # identical to the run without an outage
    assert after, "no round came after the link was back: the outage did not land mid-generation"
    resumed, finished = after[0] - cut["back"], done - cut["back"]
    print(f"\nleaf link cut for {OUTAGE_S:g}s after round {CUT_AFTER_ROUNDS}: rounds resumed {resumed:.2f}s "
          f"after the link was back, the generation finished {finished:.2f}s after it ({wall:.2f}s in all; "
          f"{site.link.refused} redials refused, stats.failovers={result['stats'].get('failovers')})")
    assert resumed < 5.0  # the leaf redials every second; the draft's retry backoff is capped at 2 s


def deploy_text(name: str, secure: Path) -> str:
    """A deploy/leaf config as this test runs it: the secrets where `draftwire auth init` wrote them, and the
    include inlined (EmbeddedNats writes its own config file elsewhere)."""
    text = (DEPLOY / name).read_text().replace("/etc/nats/secrets/", f"{secure}/")
    return text.replace('include "secrets/auth.conf"', credentials.server_authorization(secure))


def edge_part(source: str, secure: Path, tls: str) -> str:
    if source == "nats_leaf":
        return edge_config(tls=tls)
    listener = deploy_text("edge-leafnodes.conf", secure).replace("port: 7422", 'listen: "127.0.0.1:-1"')
    return 'jetstream {\n  domain: "edge"\n}\n' + listener  # the domain line the snippet asks for


def leaf_for(source: str, remote: str, secure: Path, ca: Path, local: str, monkeypatch) -> EmbeddedNats:
    seed = credentials.identity_file(secure, "device").read_text()
    if source == "nats_leaf":
        return leaf_server([remote], seed=seed, ca=ca, local=local)
    monkeypatch.setenv("DRAFTWIRE_LEAF_SEED", seed.strip())  # as leaf.conf asks
    text = re.sub(r"urls: \[[^\]]*\]", f'urls: ["{remote}"]', deploy_text("leaf.conf", secure))
    return EmbeddedNats(config_extra=text, extra_args=NO_JETSTREAM)


@pytest.mark.parametrize("source", ["nats_leaf", "deploy"])
async def test_a_secured_leaf_link_reaches_the_edges_jetstream_and_verifiers_only(tmp_path, monkeypatch,
                                                                                   source):
    """TLS on the link, which signs in as the device identity: the device's JetStream calls (mapped into the
    edge's domain), its rounds and its results cross; a subject outside its allow-list does not. The same
    with the configs `nats_leaf` renders and with deploy/leaf's files."""
    secure = credentials.ensure_credentials(tmp_path / "secure")
    files = make_dev_certs(secure / "tls")
    tls = server_tls_block(files)
    auth = credentials.server_authorization(secure)
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    async with contextlib.AsyncExitStack() as stack:
        enter = stack.enter_async_context
        edge = await enter(EmbeddedNats(store_dir=tmp_path / "js", config_extra=auth + tls + edge_part(
            source, secure, tls)))
        link = await enter(LinkProxy("127.0.0.1", leafnode_port(edge), PROFILES["lan"]))
        leaf = await enter(leaf_for(source, leaf_url("127.0.0.1", link.port), secure, files.ca, auth + tls,
                                    monkeypatch))
        as_edge = await connect(edge.url, "edge", creds=secure / "edge.nk", tls=client_context(files.ca))
        stack.push_async_callback(as_edge.close)
        admin = await connect(edge.url, "admin", creds=secure / "admin.nk", tls=client_context(files.ca))
        stack.push_async_callback(admin.close)
        device = await connect(leaf.url, "device", creds=secure / "device.nk", tls=client_context(files.ca),
                               error_cb=on_error)
        stack.push_async_callback(device.close)

        await bus.ensure_done_stream(admin.jetstream())
        await bus.publish_vocabulary(as_edge.jetstream(), "d1", b"tokenizer" * 1000)

        async def verdict(msg) -> None:
            await msg.respond(b"verdict")

        await as_edge.subscribe(SUBJECTS.verify_instance("v1"), cb=verdict)
        await flush(as_edge)
        await until_linked(device, LINKED_S, bus.DONE_STREAM)  # a device may not read the account's info
        assert await bus.fetch_vocabulary(device.jetstream(), "d1") == b"tokenizer" * 1000
        assert (await device.request(SUBJECTS.verify_instance("v1"), b"round", timeout=5)).data == b"verdict"
        ack = await device.jetstream().publish(SUBJECTS.done("s1"), b"result")
        assert ack.stream == bus.DONE_STREAM and ack.domain == "edge"
        assert not errors, errors
        # The site's own admin may publish anything on the leaf, but the link holds the device's allow-list
        # at the edge: a forged job never arrives there, while a round does.
        local_admin = await connect(leaf.url, "admin", creds=secure / "admin.nk",
                                    tls=client_context(files.ca))
        stack.push_async_callback(local_admin.close)
        forged, rounds = await admin.subscribe("draftwire.jobs.>"), await admin.subscribe(SUBJECTS.verify)
        await flush(admin)
        await asyncio.sleep(0.2)  # the edge's interest reaches the leaf
        await local_admin.publish("draftwire.jobs.client.r1", b"forged")
        await local_admin.publish(SUBJECTS.verify, b"round")
        assert (await rounds.next_msg(timeout=5)).data == b"round"
        with pytest.raises(TimeoutError):
            await forged.next_msg(timeout=0.5)
