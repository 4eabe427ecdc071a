"""The device's link to the verifiers against a real nats-server and fake verifiers (no models, seconds).

A fake verifier is a `draftwire-verifier` micro service on its own connection, as a real one is; closing
that connection is what a SIGKILL looks like to NATS. Covers discovery, the target info cache, and the fast
failover: a verifier that dies with a round in flight is noticed by its liveness ping ("no responders"), not
by the verify timeout.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
from nats.micro import add_service
from opentelemetry.trace import NoOpTracer

from draftwire.services.draft.verifier_link import (
    DISCOVERY_QUIET_S,
    PING_EVERY_S,
    NatsEdge,
    VerifierDirectory,
)
from draftwire.shared.core.link_profile import PROFILES
from draftwire.shared.core.protocol import TargetInfo
from draftwire.shared.core.speculation import RemoteError
from draftwire.shared.io.bus import INSTANCE_HEADER, SUBJECTS, VERIFY_QUEUE, connect, flush
from draftwire.shared.io.link_emulator import LinkProxy
from tests.nats_fixtures import *

INFO = {"instance": "v", "model": "m", "vocab_size": 10, "eos_token_ids": [2], "context_length": 64}


class FakeVerifier:
    """Answers verify requests with `reply` (or never, when `hang`), and the info request with INFO."""

    def __init__(self, instance: str, *, hang: bool = False, first_after=None) -> None:
        self.instance = instance
        self.hang = hang
        self.first_after = first_after  # an awaitable: the first request is answered once it is done
        self.requests = 0
        self.nc = None
        self.svc = None

    async def start(self, url: str) -> FakeVerifier:
        self.nc = await connect(url, name=self.instance)
        self.svc = await add_service(self.nc, name="draftwire-verifier", version="0.1.0",
                                     metadata={"instance": self.instance})
        for subject, queue in ((SUBJECTS.verify, VERIFY_QUEUE), (SUBJECTS.verify_instance(self.instance),
                                                                 self.instance)):
            await self.svc.add_endpoint(name=subject.replace(".", "-"), subject=subject, handler=self.verify,
                                        queue_group=queue)
        await self.svc.add_endpoint(name="info", subject=SUBJECTS.verifier_info, handler=self.info,
                                    queue_group=VERIFY_QUEUE)
        await flush(self.nc)  # subscribed at the server before anyone looks for it, like a ready service
        return self

    async def verify(self, req) -> None:
        self.requests += 1
        if self.requests == 1 and self.first_after is not None:
            await self.first_after
        if not self.hang:
            await req.respond(f"verdict from {self.instance}".encode(), headers={INSTANCE_HEADER: self.instance})

    async def info(self, req) -> None:
        await req.respond(msgpack.packb({**INFO, "instance": self.instance}))

    async def die(self) -> None:
        await self.nc.close()


def edge(nc, directory, verify_timeout=15.0, verifier_wait=5.0) -> NatsEdge:
    return NatsEdge(nc, directory, NoOpTracer(), verify_timeout=verify_timeout, verifier_wait=verifier_wait)


async def test_discovery_maps_instances_to_service_ids(nats_server, nc):
    directory = VerifierDirectory(nc)
    t0 = time.monotonic()
    assert await directory.pick(set()) is None  # nobody: "no responders" at once, not a wait for replies
    assert time.monotonic() - t0 < DISCOVERY_QUIET_S
    a, b = await FakeVerifier("va").start(nats_server.url), await FakeVerifier("vb").start(nats_server.url)
    try:
        await directory.refresh()
        assert directory.ids == {"va": a.svc.id, "vb": b.svc.id}
        assert (await directory.pick({"va"})) == ("vb", b.svc.id)
    finally:
        await a.die()
        await b.die()


async def test_target_info_is_fetched_once_and_waited_for(nats_server, nc):
    directory = VerifierDirectory(nc)
    with pytest.raises(RemoteError) as err:  # nobody answers: gives up at the given time
        await directory.target(time.time() + 0.3)
    assert err.value.code == "no_verifier"
    late = asyncio.ensure_future(directory.target(time.time() + 10))
    await asyncio.sleep(0.3)
    v = await FakeVerifier("v1").start(nats_server.url)  # appears while the job waits
    try:
        info = await asyncio.wait_for(late, 5)
        assert info == TargetInfo("m", 10, (2,), 64) and directory.cached_target() == info
    finally:
        await v.die()
    assert await directory.target(time.time()) == info  # cached: no verifier needed any more


def test_target_info_decode_refuses_malformed_replies():
    for bad in (b"\xc1", msgpack.packb([1]), msgpack.packb({**INFO, "vocab_size": 0}),
                msgpack.packb({k: v for k, v in INFO.items() if k != "eos_token_ids"})):
        with pytest.raises(ValueError):
            TargetInfo.decode(bad)


async def test_a_verifier_dying_mid_round_is_noticed_by_its_ping_not_the_timeout(nats_server, nc):
    dying = await FakeVerifier("dying", hang=True).start(nats_server.url)
    spare = await FakeVerifier("spare").start(nats_server.url)
    directory = VerifierDirectory(nc)
    await directory.refresh()
    link = edge(nc, directory, verify_timeout=30.0)
    link.instance = "dying"  # the session sticks to it, as after its first round
    try:
        rnd = asyncio.ensure_future(link.exchange(b"round", None))
        while not dying.requests:  # the round is in flight at the victim
            await asyncio.sleep(0.01)
        await dying.die()
        t_kill = time.monotonic()
        reply = await asyncio.wait_for(rnd, 10)
        stall = time.monotonic() - t_kill
        assert reply == b"verdict from spare"
        assert stall < PING_EVERY_S + 0.5, stall  # one ping period, not the 30 s verify timeout
        assert link.instance == "spare" and link.instances == ["spare"] and link.failovers == 1
        assert "dying" not in directory.ids  # the other sessions of this device will not pick it
    finally:
        await spare.die()


async def test_a_hung_verifier_is_left_only_after_the_verify_timeout(nats_server, nc):
    """Connected but silent, pings included (a frozen process): slow is not dead, the backstop decides."""
    spare = await FakeVerifier("spare").start(nats_server.url)
    hung = await connect(nats_server.url, name="hung")
    for subject in (SUBJECTS.verify_instance("hung"), "$SRV.PING.draftwire-verifier.hungid"):
        await hung.subscribe(subject)  # receives, never answers
    await flush(hung)
    directory = VerifierDirectory(nc)
    await directory.refresh()
    directory.ids["hung"] = "hungid"
    link = edge(nc, directory, verify_timeout=3.0)
    link.instance = "hung"
    try:
        t0 = time.monotonic()
        assert await link.exchange(b"round", None) == b"verdict from spare"
        assert 3.0 <= time.monotonic() - t0 < 4.5  # not at the first unanswered ping
    finally:
        await hung.close()
        await spare.die()


async def test_no_verifier_at_all_waits_then_fails(nats_server, nc):
    link = edge(nc, VerifierDirectory(nc), verifier_wait=0.5)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        await link.exchange(b"round", None)
    assert err.value.code == "no_verifier" and time.monotonic() - t0 < 3.0


def test_target_info_round_trips_with_the_instance_s_own_fields():
    info = TargetInfo("m", 10, (2, 3), 64)
    assert TargetInfo.decode(info.encode(instance="v", sessions=1, rounds=5)) == info


@pytest.mark.parametrize("addressed", [True, False], ids=["instance", "queue-group"])
async def test_a_reply_lost_while_the_device_reconnects_is_asked_for_again_at_once(nats_server, addressed):
    """The verifier answers while the device's connection is down (a NATS node died, a radio link cut): that
    reply is gone for good. The device sends the round again once reconnected, not after the verify timeout."""
    answer = asyncio.get_running_loop().create_future()
    verifier = await FakeVerifier("v", first_after=answer).start(nats_server.url)
    async with LinkProxy("127.0.0.1", nats_server.port, PROFILES["lan"]) as proxy:
        device = await connect(f"nats://127.0.0.1:{proxy.port}", name="device")
        directory = VerifierDirectory(device)
        link = edge(device, directory, verify_timeout=30.0)
        if addressed:
            await directory.refresh()
            link.instance = "v"
        try:
            rnd = asyncio.ensure_future(link.exchange(b"round", None))
            while not verifier.requests:  # the round is at the verifier
                await asyncio.sleep(0.01)
            back = proxy.outage(1.0)
            await asyncio.sleep(0.2)
            answer.set_result(None)  # answered while the device is cut off: the reply is lost
            reply = await asyncio.wait_for(rnd, 10)
            late = asyncio.get_running_loop().time() - back
            assert reply == b"verdict from v" and verifier.requests == 2 and link.resent == 1
            assert late < 3.0, late  # the reconnect and a poll, not the 30 s verify timeout
            assert link.failovers == 0 and link.instance == "v"
        finally:
            await device.close()
            await verifier.die()
