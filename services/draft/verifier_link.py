"""How the device reaches the verifiers: discovery, the target's identity, and one session's link to the edge.

A session addresses one verifier instance directly (`draftwire.verify.<instance>`), so its KV cache stays
warm, and while a round is in flight it pings that instance's micro service (`$SRV.PING.<name>.<id>`):
NATS answers "no responders" the moment the instance's connection is gone, which ends the wait at once
instead of after a timeout. The round then goes to another verifier, which answers `unknown_session`, and the
speculation loop resends it with the token history. The verify timeout stays as the backstop for a verifier
that is connected but hung. A reply the device's own connection missed (it reconnected, possibly to another
node of a cluster, while the round was in flight: NATS does not redeliver) is not waited for either: the
round is sent again at once. If the verifier had answered it, the resend no longer matches its session and
is answered `unknown_session`, so the history goes up again and the session is rebuilt with the same seeded
draws (lossless). Instances are found with micro stats (`$SRV.STATS.draftwire-verifier`), whose
replies name each instance, its micro service id and its load. A session goes to the verifier the scheduler
placed it on (`GenerateJob.verifier`) while that one is known, else to the least-loaded one
(`draftwire.shared.core.placement`); when none is known the round goes to the `verifiers` queue group and the reply
names who took it. A verifier being drained answers a round it will not serve with the `Draftwire-Draining`
header: the session moves to another verifier exactly as after a failover, and a draining instance is never
picked (`draftwire.shared.core.drain`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import NoReturn

import nats.errors
from nats.aio.client import Client
from opentelemetry import trace

from draftwire.shared.core.backoff import Backoff
from draftwire.shared.core.drain import DRAINING_HEADER
from draftwire.shared.core.placement import is_draining, least_loaded, verifier_load
from draftwire.shared.core.protocol import TargetInfo, Verdict, VerifyRequest, decode_any
from draftwire.shared.core.race import unless
from draftwire.shared.core.speculation import RemoteError
from draftwire.shared.io import bus
from draftwire.shared.io.bus import INSTANCE_HEADER, SERVICE_ERROR_HEADER, SUBJECTS
from draftwire.shared.io.loads import LoadBoard

log = logging.getLogger("draftwire.draft")

VERIFIER_SERVICE = "draftwire-verifier"
PING_EVERY_S = 0.5  # liveness ping of the addressed verifier while a round is in flight
PING_TIMEOUT_S = 1.0  # a ping that times out is not proof of death: the verify timeout decides then
DISCOVERY_WAIT_S = 0.5  # for the first discovery reply ("no responders" comes at once)
DISCOVERY_QUIET_S = 0.1  # further replies are collected until none came for this long
DISCOVERY_TTL_S = 1.0  # loads and instances are gathered again (in the background) when older than this
INFO_TIMEOUT_S = 2.0
RECONNECT_POLL_S = 0.25  # how often a round sent through the queue group looks for a reconnect


class VerifierGone(Exception):
    """The addressed verifier's connection is gone (its micro ping has no responders)."""


class LinkReconnected(Exception):
    """This connection reconnected while the round waited: its reply may have been published meanwhile, lost."""


class VerifierDirectory:
    """Verifier instances known from micro stats (instance name -> micro service id, and each one's load), and
    the target info.

    Shared by every session of a draft instance: one gathering and one info fetch serve them all. A session
    goes to the verifier the scheduler placed it on while that one is known, else to the least-loaded one.
    """

    def __init__(self, nc: Client, rng: random.Random | None = None) -> None:
        self.nc = nc
        self.ids: dict[str, str] = {}
        self.board = LoadBoard(nc, VERIFIER_SERVICE, verifier_load, ttl=DISCOVERY_TTL_S,
                               window=DISCOVERY_WAIT_S, quiet=DISCOVERY_QUIET_S, rng=rng)
        self._refreshed = float("-inf")
        self._info: TargetInfo | None = None
        self._background: asyncio.Future | None = None

    async def refresh(self) -> None:
        """Gather every verifier's identity and load; while one gathering runs, others wait for it instead."""
        await self.board.refresh()
        self.ids = {r.instance: r.service_id for r in self.board.reported.values()}
        self._refreshed = time.monotonic()

    async def pick(self, exclude: set[str], prefer: str | None = None) -> tuple[str, str] | None:
        """A known live instance (name, service id) other than `exclude`: `prefer` (the scheduler's choice)
        when it is one, else the least loaded (ties at random, so sessions spread)."""
        age = time.monotonic() - self._refreshed
        wanted = prefer is not None and prefer not in exclude and not self.draining(prefer)
        if not set(self.ids) - exclude or (wanted and prefer not in self.ids):
            if age > PING_EVERY_S:
                await self.refresh()
        elif age > DISCOVERY_TTL_S and (self._background is None or self._background.done()):
            self._background = asyncio.ensure_future(self.refresh())  # meanwhile, what we know will do
        if wanted and prefer in self.ids and not self.draining(prefer):  # (what a refresh may have said)
            name = prefer
        else:
            known = [load for load in self.board.loads() if load.instance in self.ids]
            chosen = least_loaded(known, self.board.rng, exclude)
            if chosen is None:
                return None
            name = chosen.instance
        self.board.placed(name)
        return name, self.ids[name]

    def draining(self, instance: str) -> bool:
        """Whether `instance` last reported that it is being drained."""
        reported = self.board.reported.get(instance)
        return reported is not None and is_draining(reported.data)

    def service_id(self, instance: str) -> str | None:
        return self.ids.get(instance)

    def forget(self, instance: str) -> None:
        self.ids.pop(instance, None)
        self.board.forget(instance)

    async def target(self, give_up_at: float) -> TargetInfo:
        """The target's info, fetched once and cached; waits (with backoff) for a verifier until `give_up_at`
        (unix seconds). Raises RemoteError("no_verifier") when none answered in time."""
        backoff = Backoff(initial=0.05, cap=2.0)
        while self._info is None:
            try:
                self._info = await self.fetch_target(min(INFO_TIMEOUT_S, max(0.05, give_up_at - time.time())))
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, ValueError) as exc:
                left = give_up_at - time.time()
                if left <= 0:
                    raise RemoteError("no_verifier", f"no verifier answered {SUBJECTS.verifier_info}: "
                                                     f"{type(exc).__name__}") from None
                await asyncio.sleep(min(backoff.next(), left))
        return self._info

    def cached_target(self) -> TargetInfo | None:
        return self._info

    async def fetch_target(self, timeout: float = INFO_TIMEOUT_S) -> TargetInfo:
        msg = await self.nc.request(SUBJECTS.verifier_info, b"", timeout=timeout)
        return TargetInfo.decode(msg.data)

    def drop_target(self) -> None:
        """Forget the cached info (the next `target()` refetches it): call when the edge disagrees with it."""
        self._info = None


class NatsEdge:
    """One session's path to the edge (an `EdgeTransport`): sticky to one verifier instance, failing over fast.

    `verify_timeout` bounds one round trip to a verifier that still answers pings (hung); `verifier_wait`
    bounds how long a round may wait for any verifier at all.
    """

    def __init__(self, nc: Client, directory: VerifierDirectory, tracer, verify_timeout: float,
                 verifier_wait: float, prefer: str | None = None) -> None:
        self.nc = nc
        self.directory = directory
        self.prefer = prefer  # the verifier the scheduler placed the session on
        self.tracer = tracer
        self.verify_timeout = verify_timeout
        self.verifier_wait = verifier_wait
        self.instance: str | None = None
        self.instances: list[str] = []  # every instance that answered, in order (for stats)
        self.failovers = 0
        self.resent = 0  # rounds sent again because the connection was re-established while they waited
        self._failed: set[str] = set()

    async def exchange(self, uplink: bytes, req: VerifyRequest) -> bytes:
        give_up = time.monotonic() + self.verifier_wait
        backoff = Backoff(initial=0.05, cap=2.0)
        while True:
            if self.instance is None:
                picked = await self.directory.pick(self._failed, self.prefer)
                self.instance = picked[0] if picked is not None else None
            instance = self.instance
            subject = SUBJECTS.verify_instance(instance) if instance else SUBJECTS.verify
            try:
                msg = await self._round_trip(subject, uplink, instance)
            except LinkReconnected:
                log.warning("the connection to NATS was re-established with a round in flight; sending it again")
                self.resent += 1
                continue
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, VerifierGone) as exc:
                if instance is not None:
                    log.warning("verifier %s unavailable (%s); failing over", instance, type(exc).__name__)
                    self.failovers += 1
                    self._failed.add(instance)
                    self.directory.forget(instance)
                    self.instance = None
                    continue
                if time.monotonic() > give_up:
                    raise RemoteError("no_verifier", f"no verifier answered for {self.verifier_wait:.0f}s") from exc
                self._failed.clear()  # everyone failed once: a restarted instance may be back under its name
                await asyncio.sleep(backoff.next())
                continue
            headers = msg.headers or {}
            if SERVICE_ERROR_HEADER in headers:
                raise RemoteError("verifier_error", headers.get(SERVICE_ERROR_HEADER, "unknown"))
            answered = headers.get(INSTANCE_HEADER)
            if DRAINING_HEADER in headers and (instance or answered):  # it is being drained: go elsewhere
                drained = instance or answered
                log.info("verifier %s is draining; moving the session", drained)
                self.failovers += 1
                self._failed.add(drained)
                self.directory.forget(drained)
                self.instance = None
                continue
            if answered and answered != self.instance:
                self.instance = answered
            if answered and (not self.instances or self.instances[-1] != answered):
                self.instances.append(answered)
            return msg.data

    async def _round_trip(self, subject: str, uplink: bytes, instance: str | None):
        """One request, raced against a liveness watch of the addressed instance (when it is known)."""
        with self.tracer.start_as_current_span("verify_rpc", kind=trace.SpanKind.CLIENT) as span:
            span.set_attributes({"draftwire.uplink_bytes": len(uplink), "messaging.destination": subject})
            t_send = time.time_ns()
            reconnects = self.nc.stats["reconnects"]
            rpc = bus.request(self.nc, subject, uplink, timeout=self.verify_timeout)
            # the watch ends only by raising VerifierGone or LinkReconnected, which `unless` re-raises (a bug in
            # it too, never hidden)
            _, msg = await unless(rpc, self._watch(instance, reconnects))
            self._link_spans(t_send, time.time_ns(), msg.data)
            return msg

    async def _watch(self, instance: str | None, reconnects: int) -> NoReturn:
        """Raise VerifierGone as soon as `instance` (when one is addressed) has no responders, LinkReconnected
        once this connection has reconnected since `reconnects` (the reply may have been lost); run until
        cancelled otherwise."""
        while True:
            await asyncio.sleep(RECONNECT_POLL_S if instance is None else PING_EVERY_S)
            if self.nc.stats["reconnects"] != reconnects and self.nc.is_connected:
                raise LinkReconnected()
            if instance is None:
                continue
            service_id = self.directory.service_id(instance)
            if service_id is None:  # reached through the queue group: learn its id for the next ping
                await self.directory.refresh()
                continue
            try:
                await self.nc.request(f"$SRV.PING.{VERIFIER_SERVICE}.{service_id}", b"", timeout=PING_TIMEOUT_S)
            except nats.errors.NoRespondersError:
                log.warning("verifier %s (%s) has no responders", instance, service_id)
                raise VerifierGone(instance) from None
            except nats.errors.TimeoutError:
                continue  # slow is not dead: the verify timeout is the backstop

    def _link_spans(self, t_send: int, t_recv: int, downlink: bytes) -> None:
        """Split the round trip into uplink / edge / downlink spans from the verdict's own timestamps."""
        try:
            reply = decode_any(downlink)
        except ValueError:
            return
        if not isinstance(reply, Verdict) or reply.sent_at <= 0:
            return
        down_ns = max(0, min(t_recv - int(reply.sent_at * 1e9), t_recv - t_send))
        up_ns = max(0, t_recv - t_send - down_ns - int(reply.verify_s * 1e9))
        self.tracer.start_span("uplink", start_time=t_send).end(end_time=t_send + up_ns)
        self.tracer.start_span("downlink", start_time=t_recv - down_ns).end(end_time=t_recv)


__all__ = ["LinkReconnected", "NatsEdge", "VerifierDirectory", "VerifierGone"]
