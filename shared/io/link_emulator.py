"""An asyncio TCP proxy that shapes real bytes in both directions with a `LinkProfile`.

Put it in front of NATS and point the device-side services at it: everything they send (verify requests)
crosses the uplink shaper, everything they receive (verdicts, jobs) the downlink one. Chunks are cut to
`CHUNK` bytes so a large message streams through the bottleneck instead of arriving all at once at the end.
The profile can be swapped while connections are open (`bench` walks the profiles on one running stack);
the change applies to bytes read after it.

`outage(seconds)` drops the link outright, unlike a profile's outage windows (which only hold delivery back):
every open connection is cut at once, bytes still in flight are lost, and new connections are refused until
the link is back. That is what a leaf node's link to the edge sees when a site's uplink fails: the
connection closes, the leaf keeps dialling, and whatever crossed it must be recovered by the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Self

from draftwire.shared.core.link_profile import LinkProfile, Shaper

CHUNK = 16 * 1024
log = logging.getLogger("draftwire.link")


class LinkProxy:
    def __init__(self, upstream_host: str, upstream_port: int, profile: LinkProfile,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen = (listen_host, listen_port)
        self._profile = profile
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._handlers: set[asyncio.Task] = set()  # one per connection (`_on_client`)
        self._pipes: list[_Pipe] = []
        self._down_until = float("-inf")  # loop time until which the link is cut (`outage`)
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0  # connections cut by outages
        self.refused = 0  # connections refused during outages

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    @profile.setter
    def profile(self, p: LinkProfile) -> None:
        self._profile = p
        for pipe in self._pipes:
            pipe.shaper = Shaper.uplink(p) if pipe.up else Shaper.downlink(p)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"nats://{self.listen[0]}:{self.port}"

    @property
    def down(self) -> bool:
        """True while an `outage` lasts."""
        return asyncio.get_running_loop().time() < self._down_until

    def outage(self, seconds: float) -> float:
        """Cut the link for `seconds` from now: abort every open connection (both ends see it close, with
        whatever was queued on the shapers lost) and refuse new ones until then. Returns at once, with the
        loop time at which the link is back; an outage under way is extended, never shortened."""
        loop = asyncio.get_running_loop()
        self._down_until = max(self._down_until, loop.time() + seconds)
        pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.cut()
        self.cuts += len(pipes) // 2
        log.warning("link proxy: link cut for %.3gs (%d connections)", seconds, len(pipes) // 2)
        return self._down_until

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._on_client, *self.listen)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *self._handlers, return_exceptions=True)  # each closes its sockets
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _on_client(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            c_writer.transport.abort()
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.warning("link proxy: upstream %s:%d unreachable: %s", *self.upstream, exc)
            c_writer.close()
            return
        if self.down:  # the link went down while we dialled
            self.refused += 1
            for w in (c_writer, u_writer):
                w.transport.abort()
            return
        for w in (c_writer, u_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = _Pipe(self, c_reader, u_writer, up=True)
        down = _Pipe(self, u_reader, c_writer, up=False)
        self._pipes += [up, down]
        tasks = [asyncio.create_task(p.run()) for p in (up, down)]
        up.task, down.task = tasks
        self._tasks.update(tasks)
        handler = asyncio.current_task()
        self._handlers.add(handler)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            for p in (up, down):
                if p in self._pipes:
                    self._pipes.remove(p)
            for w in (c_writer, u_writer):
                w.close()
            self._handlers.discard(handler)


class _Pipe:
    """One direction: read, schedule each chunk on the shaper, write it at its delivery time."""

    def __init__(self, proxy: LinkProxy, reader, writer, up: bool) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.up = up
        self.shaper = Shaper.uplink(proxy.profile) if up else Shaper.downlink(proxy.profile)
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def cut(self) -> None:
        """Close its outgoing socket without flushing and stop: the connection handler then ends."""
        self.writer.transport.abort()
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        sender = asyncio.create_task(self._send())
        try:
            loop = asyncio.get_running_loop()
            while data := await self.reader.read(CHUNK):
                for i in range(0, len(data), CHUNK):
                    piece = data[i : i + CHUNK]
                    self.queue.put_nowait((self.shaper.deliver_at(loop.time(), len(piece)), piece))
                if self.up:
                    self.proxy.bytes_up += len(data)
                else:
                    self.proxy.bytes_down += len(data)
            self.queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self.queue.get()) is not None:
            at, piece = item
            await _sleep_until(loop, at)
            self.writer.write(piece)
            await self.writer.drain()


class ShapedEdge:
    """The in-process engine's link (`generate --local --link`): the same shapers, applied as waits.

    Wraps another `draftwire.shared.core.speculation.EdgeTransport`; each round's encoded bytes are scheduled on the uplink shaper, the
    reply's on the downlink one, and the round waits until both would have been delivered.
    """

    def __init__(self, inner, profile: LinkProfile) -> None:
        self.inner = inner
        self.up = Shaper.uplink(profile)
        self.down = Shaper.downlink(profile)

    async def exchange(self, uplink: bytes, req) -> bytes:
        loop = asyncio.get_running_loop()
        await _sleep_until(loop, self.up.deliver_at(loop.time(), len(uplink)))
        reply = await self.inner.exchange(uplink, req)
        await _sleep_until(loop, self.down.deliver_at(loop.time(), len(reply)))
        return reply


async def _sleep_until(loop: asyncio.AbstractEventLoop, t: float) -> None:
    if (wait := t - loop.time()) > 0:
        await asyncio.sleep(wait)
