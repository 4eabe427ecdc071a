"""Lockdown: per-role identities on a real nats-server, what each may publish and subscribe, and the attacks
of the lockdown issue replayed with `client` and `device` credentials against a secured stack.

The permission matrix is written out by hand (the spec), not derived from `draftwire.shared.core.nats_permissions`:
each row is checked both ways on a server started with the generated config, allowed traffic arriving and
forbidden traffic refused (the server's permissions violation, and nothing delivered).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import nats
import nats.errors
import pytest
import pytest_asyncio

from draftwire.services.cli.stack import start_stack
from draftwire.shared.core.nats_permissions import authorization_block, role_permissions
from draftwire.shared.io import bus, credentials
from draftwire.shared.io.bus import JOBS_CONSUMER, JOBS_STREAM, SUBJECTS, SUBMIT_STREAM, connect, flush
from draftwire.shared.io.nats_server import EmbeddedNats

ROLES = ("admin", "scheduler", "edge", "device", "telemetry", "client", "bob", "dev2")  # a second tenant, device

# Concrete subjects standing for every pattern the system uses ("client" is the first tenant's name).
SELF_PING = {"scheduler": "$SRV.PING.draftwire-scheduler", "edge": "$SRV.PING.draftwire-verifier",
             "device": "$SRV.PING.draftwire-draft", "dev2": "$SRV.PING.draftwire-draft",
             "telemetry": "$SRV.PING.draftwire-telemetry"}
# The target tokenizers' object store: the edge writes it, devices only read it, nobody else touches it.
VOCAB_READ = {"$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.OBJ_DRAFTWIRE_VOCAB", "$JS.API.STREAM.MSG.GET.OBJ_DRAFTWIRE_VOCAB",
              "$JS.API.CONSUMER.CREATE.OBJ_DRAFTWIRE_VOCAB", "$JS.FC.OBJ_DRAFTWIRE_VOCAB.x.1"}
VOCAB_WRITE = {"$JS.API.STREAM.CREATE.OBJ_DRAFTWIRE_VOCAB", "$JS.API.STREAM.PURGE.OBJ_DRAFTWIRE_VOCAB",
               "$O.DRAFTWIRE_VOCAB.C.x", "$O.DRAFTWIRE_VOCAB.M.x"}
SUBJECTS_USED = [
    "draftwire.prompts", "draftwire.prompts.client", "draftwire.prompts.bob",
    "draftwire.submit", "draftwire.submit.client", "draftwire.submit.bob",
    "draftwire.results.r1", "draftwire.results.client.r1", "draftwire.results.bob.r1",
    "draftwire.stream.r1", "draftwire.stream.client.r1", "draftwire.stream.bob.r1",
    "draftwire.cancel.r1", "draftwire.cancel.client.r1", "draftwire.cancel.bob.r1",
    "draftwire.jobs.client.r1", "draftwire.done.s1",
    "draftwire.verify", "draftwire.verify.v1", "draftwire.verifier.info", "draftwire.sessions.close",
    "draftwire.draft.start", "draftwire.draft.start.d1", "draftwire.draft.session.s1",
    "draftwire.dev.device.start.d1", "draftwire.dev.device.session.s1", "draftwire.dev.device.cancel.s1",
    "draftwire.dev.device.chunk.s1", "draftwire.dev.dev2.start.d1", "draftwire.dev.dev2.session.s1",
    "draftwire.dev.dev2.chunk.s1",
    "draftwire.verifier.drain.v1", "draftwire.dev.device.drain.d1",  # only admin may drain an instance
    "draftwire.events.round", "draftwire.events.request", "draftwire.telemetry.stats",
    "draftwire.scheduler.sessions", "draftwire.scheduler.sessions.s1",
    "$SRV.PING", "$SRV.STATS.draftwire-verifier", "$SRV.PING.draftwire-verifier.x1", "$SRV.STATS.draftwire-draft",
    "$SRV.INFO.draftwire-draft", "$SRV.INFO.draftwire-verifier",
    *SELF_PING.values(),  # each service's container health check pings its own service
    *sorted(VOCAB_READ | VOCAB_WRITE), "$JS.API.STREAM.DELETE.OBJ_DRAFTWIRE_VOCAB",
    "_INBOX.client.x", "_INBOX.bob.x", "_INBOX.device.x", "_INBOX.edge.x", "_INBOX.scheduler.x",
]
ALL = set(SUBJECTS_USED)

MAY_PUBLISH = {
    "admin": ALL,
    "client": {"draftwire.prompts.client", "draftwire.submit.client", "draftwire.cancel.client.r1",
               "draftwire.verifier.info"},
    "bob": {"draftwire.prompts.bob", "draftwire.submit.bob", "draftwire.cancel.bob.r1", "draftwire.verifier.info"},
    "scheduler": {"draftwire.results.client.r1", "draftwire.results.bob.r1", "draftwire.results.r1",
                  "draftwire.stream.r1", "draftwire.stream.client.r1", "draftwire.stream.bob.r1",
                  "draftwire.jobs.client.r1", "draftwire.draft.start", "draftwire.draft.start.d1",
                  "draftwire.draft.session.s1", "draftwire.dev.device.start.d1", "draftwire.dev.device.session.s1",
                  "draftwire.dev.device.cancel.s1", "draftwire.dev.dev2.start.d1", "draftwire.dev.dev2.session.s1",
                  "draftwire.scheduler.sessions.s1", "$SRV.STATS.draftwire-verifier",
                  "$SRV.STATS.draftwire-draft", "_INBOX.client.x", "_INBOX.bob.x", "_INBOX.device.x",
                  "_INBOX.edge.x", "_INBOX.scheduler.x", "draftwire.events.request", SELF_PING["scheduler"]},
    "edge": {SELF_PING["edge"], *VOCAB_READ, *VOCAB_WRITE},  # replies, its health check, the tokenizer store
    "device": {"draftwire.verify", "draftwire.verify.v1", "draftwire.verifier.info", "draftwire.sessions.close",
               "draftwire.events.round", "draftwire.events.request", "draftwire.dev.device.chunk.s1",
               "draftwire.done.s1", "$SRV.STATS.draftwire-verifier", "$SRV.PING.draftwire-verifier.x1",
               SELF_PING["device"], *VOCAB_READ},
    "dev2": {"draftwire.verify", "draftwire.verify.v1", "draftwire.verifier.info", "draftwire.sessions.close",
             "draftwire.events.round", "draftwire.events.request", "draftwire.dev.dev2.chunk.s1",
             "draftwire.done.s1", "$SRV.STATS.draftwire-verifier", "$SRV.PING.draftwire-verifier.x1",
             SELF_PING["dev2"], *VOCAB_READ},
    "telemetry": {"$SRV.STATS.draftwire-draft", "$SRV.STATS.draftwire-verifier", SELF_PING["telemetry"]},
}
_MICRO = {"$SRV.PING"}
MAY_SUBSCRIBE = {
    "admin": ALL,
    "client": {"draftwire.results.client.r1", "draftwire.stream.client.r1", "_INBOX.client.x"},
    "bob": {"draftwire.results.bob.r1", "draftwire.stream.bob.r1", "_INBOX.bob.x"},
    "scheduler": {"draftwire.prompts", "draftwire.prompts.client", "draftwire.prompts.bob", "draftwire.cancel.r1",
                  "draftwire.cancel.client.r1", "draftwire.cancel.bob.r1", "draftwire.done.s1",
                  "draftwire.scheduler.sessions", "draftwire.scheduler.sessions.s1", "_INBOX.scheduler.x",
                  "draftwire.dev.device.chunk.s1", "draftwire.dev.dev2.chunk.s1", SELF_PING["scheduler"], *_MICRO},
    "edge": {"draftwire.verify", "draftwire.verify.v1", "draftwire.verifier.info", "draftwire.sessions.close",
             "draftwire.verifier.drain.v1", "$SRV.STATS.draftwire-verifier", "$SRV.PING.draftwire-verifier.x1", "$SRV.INFO.draftwire-verifier",
             "_INBOX.edge.x", SELF_PING["edge"], *_MICRO},
    "device": {"draftwire.dev.device.start.d1", "draftwire.dev.device.session.s1", "draftwire.dev.device.cancel.s1",
               "draftwire.dev.device.chunk.s1", "draftwire.dev.device.drain.d1", "$SRV.STATS.draftwire-draft",
               "$SRV.INFO.draftwire-draft", "_INBOX.device.x", SELF_PING["device"], *_MICRO},
    "dev2": {"draftwire.dev.dev2.start.d1", "draftwire.dev.dev2.session.s1", "draftwire.dev.dev2.chunk.s1",
             "$SRV.STATS.draftwire-draft", "$SRV.INFO.draftwire-draft", SELF_PING["dev2"], *_MICRO},
    "telemetry": {"draftwire.events.round", "draftwire.events.request", "draftwire.telemetry.stats",
                  SELF_PING["telemetry"], *_MICRO},
}
SETTLE_S = 0.3  # for traffic that must NOT arrive: how long we give it to (wrongly) show up
WAIT_S = 10.0  # for what must happen (a delivery, a violation report), on a loaded machine


async def _until(condition, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Watched:
    """A connection that records the server's permission violations (nats-py reports them to error_cb)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc = None

    async def connect(self, url: str, creds=None, **kw) -> Watched:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await connect(url, "test", creds=creds, error_cb=on_error, **kw)
        return self

    def refused(self, subject: str) -> bool:
        quoted = f'"{subject}"'.lower()  # nats-py lowercases the server's message
        return any("permissions violation" in e.lower() and quoted in e.lower() for e in self.errors)


@pytest.fixture
def secure_dir(tmp_path):
    d = credentials.ensure_credentials(tmp_path / "secure")
    credentials.add_client(d, "bob")
    credentials.add_identity(d, "dev2", "device")
    return d


@pytest_asyncio.fixture
async def secured_server(secure_dir):
    async with EmbeddedNats(config_extra=credentials.server_authorization(secure_dir)) as server:
        yield server


async def _as(server, secure_dir, name: str) -> Watched:
    return await Watched().connect(server.url, creds=credentials.identity_file(secure_dir, name))


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_publishes_exactly_what_it_may(secured_server, secure_dir, role):
    admin, me = await _as(secured_server, secure_dir, "admin"), await _as(secured_server, secure_dir, role)
    seen: set[str] = set()

    async def record(msg) -> None:
        if msg.data == b"probe":
            seen.add(msg.subject)

    await admin.nc.subscribe(">", cb=record)
    await flush(admin.nc)
    for subject in SUBJECTS_USED:
        await me.nc.publish(subject, b"probe")
    await flush(me.nc)
    forbidden = ALL - MAY_PUBLISH[role]
    await _until(lambda: seen >= MAY_PUBLISH[role] and all(me.refused(s) for s in forbidden), "the traffic")
    await asyncio.sleep(SETTLE_S)
    assert seen == MAY_PUBLISH[role]
    await asyncio.gather(admin.nc.close(), me.nc.close())


@pytest.mark.parametrize("role", ROLES)
async def test_each_role_subscribes_to_exactly_what_it_may(secured_server, secure_dir, role):
    admin, me = await _as(secured_server, secure_dir, "admin"), await _as(secured_server, secure_dir, role)
    got: set[str] = set()

    async def record(msg) -> None:
        got.add(msg.subject)

    for subject in SUBJECTS_USED:
        await me.nc.subscribe(subject, cb=record)
    await flush(me.nc)
    forbidden = ALL - MAY_SUBSCRIBE[role]
    await _until(lambda: all(me.refused(s) for s in forbidden), "the violation reports")
    for subject in SUBJECTS_USED:
        await admin.nc.publish(subject, b"x")
    await flush(admin.nc)
    await _until(lambda: got >= MAY_SUBSCRIBE[role], "the deliveries")
    await asyncio.sleep(SETTLE_S)
    assert got == MAY_SUBSCRIBE[role]
    await asyncio.gather(admin.nc.close(), me.nc.close())


async def test_nobody_but_admin_may_subscribe_to_everything(secured_server, secure_dir):
    for role in ROLES[1:]:
        me = await _as(secured_server, secure_dir, role)
        await me.nc.subscribe(">")
        await me.nc.subscribe("draftwire.>")
        await flush(me.nc)
        await _until(lambda me=me: me.refused(">") and me.refused("draftwire.>"), f"{role}'s violation reports")
        await me.nc.close()


async def test_the_edge_writes_the_tokenizer_store_and_a_device_may_only_read_it(secured_server, secure_dir):
    """Through nats-py's object store, as the services use it: the edge creates the bucket and stores a
    bundle under its digest, a device fetches it by that digest, and a device's write or delete is refused."""
    edge, device = await _as(secured_server, secure_dir, "edge"), await _as(secured_server, secure_dir, "device")
    digest, data = "ab" * 32, b"bundle bytes" * 50_000  # several chunks
    assert await bus.publish_vocabulary(edge.nc.jetstream(), digest, data)
    assert not await bus.publish_vocabulary(edge.nc.jetstream(), digest, data)  # once per digest
    assert await bus.fetch_vocabulary(device.nc.jetstream(), digest) == data
    assert not device.errors
    store = await bus.vocab_store(device.nc.jetstream(), create=False)
    with pytest.raises((nats.errors.Error, TimeoutError)):  # its chunk is refused: no ack comes
        await asyncio.wait_for(store.put("cd" * 32, b"forged"), 2.0)
    await _until(lambda: any('"$o.draftwire_vocab.c.' in e.lower() for e in device.errors), "the refusal")
    assert await bus.fetch_vocabulary(edge.nc.jetstream(), digest) == data
    await asyncio.gather(edge.nc.close(), device.nc.close())


async def test_a_responder_may_answer_the_requests_it_receives_and_nothing_else(secured_server, secure_dir):
    edge, device = await _as(secured_server, secure_dir, "edge"), await _as(secured_server, secure_dir, "device")

    async def answer(msg) -> None:
        await msg.respond(b"verdict")

    await edge.nc.subscribe("draftwire.verify.v1", cb=answer)
    await flush(edge.nc)
    assert (await device.nc.request("draftwire.verify.v1", b"round", timeout=WAIT_S)).data == b"verdict"
    await edge.nc.publish("_INBOX.device.unsolicited", b"forged")  # not a reply to anything it received
    await flush(edge.nc)
    await _until(lambda: edge.refused("_INBOX.device.unsolicited"), "the violation report")


async def test_connections_without_or_with_unknown_credentials_are_refused(secured_server, tmp_path):
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await connect(secured_server.url, "anonymous", initial_timeout=2)
    stranger = credentials.ensure_credentials(tmp_path / "elsewhere")  # valid seeds the server never admitted
    with pytest.raises(ConnectionError, match="Authorization Violation"):
        await connect(secured_server.url, "stranger", creds=stranger / "client.nk", initial_timeout=2)
    (tmp_path / "broken.nk").write_text("not a seed\n")
    with pytest.raises(ConnectionError, match="not an nkey seed file"):
        await connect(secured_server.url, "broken", creds=tmp_path / "broken.nk")


async def test_identities_are_reused_and_a_client_added_later_is_admitted_after_a_reload(secure_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in secure_dir.glob("*.nk")}
    credentials.ensure_credentials(secure_dir)
    assert {p.name: p.read_bytes() for p in secure_dir.glob("*.nk")} == before
    assert all(p.stat().st_mode & 0o077 == 0 for p in secure_dir.glob("*.nk"))
    async with EmbeddedNats(config_extra=credentials.server_authorization(secure_dir)) as server:
        carol = credentials.add_client(secure_dir, "carol")
        with pytest.raises(ConnectionError):
            await connect(server.url, "carol", creds=carol, initial_timeout=1)
        server.reload(credentials.server_authorization(secure_dir))
        await asyncio.sleep(0.3)
        nc = await connect(server.url, "carol", creds=carol)
        await nc.close()
    with pytest.raises(ValueError, match="already the edge identity"):
        credentials.add_client(secure_dir, "edge")


def test_every_role_s_config_names_its_own_inbox_and_unknown_roles_fail():
    text = authorization_block([("UKEY", "client", "alice"), ("UKEY2", "edge", "edge")])
    assert '"_INBOX.alice.>"' in text and '"draftwire.results.alice.*"' in text and "allow_responses" in text
    # the edge publishes no draftwire subject (it only replies): exactly its health check and the tokenizer store
    vocab = "OBJ_DRAFTWIRE_VOCAB"
    assert set(role_permissions("edge", "edge").publish) == {
        "$SRV.PING.draftwire-verifier", "$JS.API.STREAM.NAMES", f"$JS.API.STREAM.INFO.{vocab}",
        f"$JS.API.STREAM.MSG.GET.{vocab}", f"$JS.API.DIRECT.GET.{vocab}", f"$JS.API.DIRECT.GET.{vocab}.>",
        f"$JS.API.CONSUMER.CREATE.{vocab}", f"$JS.API.CONSUMER.CREATE.{vocab}.>", f"$JS.FC.{vocab}.>",
        f"$JS.API.STREAM.CREATE.{vocab}", f"$JS.API.STREAM.PURGE.{vocab}", "$O.DRAFTWIRE_VOCAB.>"}
    with pytest.raises(ValueError, match="unknown role"):
        role_permissions("root", "x")


# --- the attacks, against a secured stack -------------------------------------------------------------------


def _stack_args(secure: str) -> argparse.Namespace:
    return argparse.Namespace(
        nats=None, nats_port=0, telemetry_port=0, draft_model="tiny-random", draft_dtype="fp32",
        target_model="tiny-random", target_dtype="fp32", mode="tkslt", gamma=4, k=8, secure=secure,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    secure = tmp_path_factory.mktemp("secure")
    credentials.add_client(secure, "bob")
    credentials.add_identity(secure, "dev2", "device")
    st = await start_stack(_stack_args(str(secure)), quiet=True, store_dir=str(tmp_path_factory.mktemp("js")))
    yield st
    await st.stop()


async def _client(stack, name: str) -> Watched:
    return await Watched().connect(stack.url, creds=credentials.identity_file(stack.secure_dir, name),
                                   tls=stack.client_tls())


async def _session_of(admin: Watched, rid: str) -> str:
    """The session id the scheduler gave request `rid` (admin may list them), once it is running."""
    for _ in range(200):
        listing = json.loads((await admin.nc.request("draftwire.scheduler.sessions", b"", timeout=2)).data)
        for entry in listing.get("sessions", []):
            if entry["id"] == rid and entry["state"] == "running":
                return entry["session"]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{rid} never ran")


async def _generate(w: Watched, tenant: str, rid: str, stream: bool = False, tokens: int = 12
                    ) -> tuple[dict, list[dict]]:
    chunks: list[dict] = []
    sub = None
    if stream:
        async def append(msg) -> None:
            chunks.append(json.loads(msg.data))

        sub = await w.nc.subscribe(SUBJECTS.stream(rid, tenant), cb=append)
    body = {"id": rid, "prompt": "hello there", "max_new_tokens": tokens, "min_new_tokens": tokens,
            "temperature": 0, "stream": stream}
    msg = await w.nc.request(SUBJECTS.prompts_for(tenant), json.dumps(body).encode(), timeout=60)
    if sub is not None:
        for _ in range(100):  # relayed by the scheduler, the last chunk may trail the reply
            if chunks and chunks[-1].get("done"):
                break
            await asyncio.sleep(0.01)
        await sub.unsubscribe()
    return json.loads(msg.data), chunks


@pytest.mark.asyncio(loop_scope="module")
async def test_a_secured_stack_serves_its_tenants_and_refuses_the_issue_s_attacks(stack):
    alice, bob, device = await _client(stack, "client"), await _client(stack, "bob"), await _client(stack, "device")
    baseline, _ = await _generate(alice, "client", "base")
    assert "error" not in baseline and baseline["token_ids"]

    # forged verdicts: answering the verify subjects before the real verifier
    async def forge(msg) -> None:
        await msg.respond(b"forged verdict")

    for attacker in (bob, device):
        for subject in (SUBJECTS.verify, f"{SUBJECTS.verify}.*", f"{SUBJECTS.verify}.>"):
            await attacker.nc.subscribe(subject, cb=forge)
    # eavesdropping on another tenant, and on everything
    overheard = []

    async def overhear(msg) -> None:
        overheard.append(msg.subject)

    for subject in (">", "draftwire.>", "draftwire.results.client.*", "draftwire.stream.client.*",
                    "_INBOX.client.>", "draftwire.prompts.client", "draftwire.jobs.>"):
        await bob.nc.subscribe(subject, cb=overhear)
    await asyncio.gather(flush(bob.nc), flush(device.nc))
    await asyncio.sleep(SETTLE_S)

    result, chunks = await _generate(alice, "client", "under-attack", stream=True)
    assert result["token_ids"] == baseline["token_ids"], "the legitimate request's output changed"
    assert chunks and chunks[-1]["done"]
    assert overheard == [], f"bob overheard {overheard}"
    for subject in (SUBJECTS.verify, f"{SUBJECTS.verify}.*", ">", "draftwire.results.client.*", "_INBOX.client.>"):
        assert bob.refused(subject), subject
    assert device.refused(SUBJECTS.verify) and device.refused(f"{SUBJECTS.verify}.*")

    # forged verify requests, a job sent straight to a draft, the sessions listing, stream purge and
    # consumer deletion: all refused for a client, and the queue-breaking ones for a device too
    from tests.test_loadtest import _request

    attacks = [
        (bob, SUBJECTS.verify, _request().encode()),
        (bob, SUBJECTS.draft_start, b"{}"),
        (bob, "draftwire.scheduler.sessions", b""),
        (bob, SUBJECTS.prompts_for("client"), b'{"id": "as-alice", "prompt": "x"}'),
        (bob, f"$JS.API.CONSUMER.DELETE.{JOBS_STREAM}.{JOBS_CONSUMER}", b""),
        (bob, f"$JS.API.STREAM.PURGE.{JOBS_STREAM}", b""),
        (bob, f"$JS.API.STREAM.DELETE.{SUBMIT_STREAM}", b""),
        (device, f"$JS.API.CONSUMER.DELETE.{JOBS_STREAM}.{JOBS_CONSUMER}", b""),
        (device, f"$JS.API.STREAM.PURGE.{SUBMIT_STREAM}", b""),
        (device, "draftwire.scheduler.sessions", b""),
    ]
    for attacker, subject, payload in attacks:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attacker.nc.request(subject, payload, timeout=0.5)
        await _until(lambda a=attacker, s=subject: a.refused(s), f"the violation report for {subject}")

    # another device: cannot read the first device's jobs or pings, nor speak for a session placed there
    dev2 = await _client(stack, "dev2")
    for subject in ("draftwire.dev.device.>", "draftwire.dev.*.start.*", "draftwire.draft.session.*"):
        await dev2.nc.subscribe(subject, cb=overhear)
    admin = await _client(stack, "admin")
    running = asyncio.create_task(_generate(alice, "client", "long-one", stream=True, tokens=120))
    session = await _session_of(admin, "long-one")
    forged = json.dumps({"id": "long-one", "text": "FORGED", "token_ids": [1], "done": False}).encode()
    await dev2.nc.publish(f"draftwire.dev.device.chunk.{session}", forged)
    await dev2.nc.publish(f"draftwire.dev.dev2.chunk.{session}", forged)  # its own prefix: not its session
    result, chunks = await running
    assert "error" not in result and all(c.get("text") != "FORGED" for c in chunks)
    assert overheard == [] and dev2.refused("draftwire.dev.device.>") and dev2.refused("draftwire.dev.*.start.*")
    assert dev2.refused(f"draftwire.dev.device.chunk.{session}")
    await dev2.nc.close()

    js = admin.nc.jetstream()
    assert (await js.consumer_info(JOBS_STREAM, JOBS_CONSUMER)).name == JOBS_CONSUMER
    after, _ = await _generate(alice, "client", "after-attacks")
    assert after["token_ids"] == baseline["token_ids"]
    theirs, _ = await _generate(bob, "bob", "bobs-own")  # the other tenant is served on its own subjects
    assert theirs["token_ids"] == baseline["token_ids"]
    results = await bob.nc.subscribe(SUBJECTS.results("fire-and-forget", "bob"))  # and through the queue
    body = {"id": "fire-and-forget", "prompt": "hello there", "max_new_tokens": 12, "min_new_tokens": 12,
            "temperature": 0}
    await bob.nc.jetstream().publish(SUBJECTS.submit_for("bob"), json.dumps(body).encode())
    assert json.loads((await results.next_msg(timeout=60)).data)["token_ids"] == baseline["token_ids"]
    for w in (alice, bob, device, admin):
        await w.nc.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_secured_stack_refuses_plain_connections_and_anonymous_ones(stack):
    with pytest.raises(ConnectionError):  # right identity, no TLS
        await connect(stack.url, "no-tls", creds=credentials.identity_file(stack.secure_dir, "client"),
                      initial_timeout=2)
    with pytest.raises(ConnectionError):  # TLS, no identity
        await connect(stack.url, "anonymous", tls=stack.client_tls(), initial_timeout=2)
    nc = await nats.connect(stack.url, tls=stack.client_tls(), nkeys_seed=str(
        credentials.identity_file(stack.secure_dir, "client")), inbox_prefix="_INBOX.client")
    await nc.close()


async def test_a_running_secured_stack_admits_a_client_added_while_it_runs(tmp_path):
    """What `draftwire up --secure` does each second: `auth add-client` rewrote auth.conf, NATS reloads it."""
    from draftwire.services.cli.stack import Stack
    from draftwire.shared.io.tls import client_context, make_dev_certs, server_tls_block

    secure = credentials.ensure_credentials(tmp_path / "secure")
    tls = make_dev_certs(secure / "tls")
    tls_block = server_tls_block(tls)
    server = EmbeddedNats(config_extra=credentials.server_authorization(secure) + tls_block)
    await server.start()
    stack = Stack(url=server.url, nats=server, secure_dir=str(secure), tls_block=tls_block)
    try:
        assert stack.admit_new_identities() is False  # nothing changed
        dave = credentials.add_client(secure, "dave")
        with pytest.raises(ConnectionError):
            await connect(server.url, "dave", creds=dave, tls=client_context(tls.ca), initial_timeout=1)
        assert stack.admit_new_identities() is True
        await asyncio.sleep(0.3)
        nc = await connect(server.url, "dave", creds=dave, tls=stack.client_tls())
        await nc.close()
        assert stack.admit_new_identities() is False
    finally:
        await stack.stop()


def test_bad_identity_names_and_missing_credentials_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="identity name"):
        credentials.add_client(tmp_path / "s", "bad name")
    with pytest.raises(ValueError, match="identity name"):
        credentials.add_identity(tmp_path / "s", "a.b", "device")
    with pytest.raises(ValueError, match="does not exist"):
        credentials.load_identity(tmp_path / "nope.nk")
