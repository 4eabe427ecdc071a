"""The link emulator: `--link` parsing, the shaper's schedule, and real bytes through the proxy."""

from __future__ import annotations

import asyncio
import time

import pytest

from draftwire.shared.core.link_profile import (
    PROFILES,
    LinkError,
    LinkProfile,
    Shaper,
    parse_link,
    parse_rate,
    parse_time,
)
from draftwire.shared.io.link_emulator import LinkProxy, ShapedEdge


def test_profiles_and_overrides() -> None:
    cell = parse_link("cell-edge")
    assert (cell.up_bps, cell.down_bps, cell.rtt_s) == (2e6, 10e6, 0.040)
    assert set(PROFILES) >= {"lan", "5g", "cell-edge"}
    custom = parse_link("up=2Mbit/s,down=10M,rtt=40ms,jitter=2ms")
    assert (custom.up_bps, custom.down_bps, custom.rtt_s, custom.jitter_s) == (2e6, 10e6, 0.040, 0.002)
    slower = parse_link("5g,rtt=80ms,outage=1s/10s")
    assert slower.up_bps == PROFILES["5g"].up_bps and slower.rtt_s == 0.08
    assert (slower.outage_s, slower.outage_every_s) == (1.0, 10.0)
    assert parse_rate("500k") == 5e5 and parse_rate("1e6") == 1e6 and parse_time("40") == 0.04
    assert parse_time("800us") == pytest.approx(8e-4)


@pytest.mark.parametrize("bad", ["", "wifi7", "up=2M", "up=fast,down=1M,rtt=1ms", "lan,color=red",
                                 "lan,rtt=-4ms", "lan,outage=5s/1s", "lan,outage=5s", "up=0,down=1M,rtt=1ms"])
def test_bad_link_specs_are_explained(bad: str) -> None:
    with pytest.raises(LinkError):
        parse_link(bad)


def test_shaper_queues_behind_the_bottleneck_and_never_reorders() -> None:
    s = Shaper(bps=8000.0, delay_s=0.5)  # 1000 bytes/s
    assert s.deliver_at(0.0, 1000) == pytest.approx(1.5)  # 1 s on the wire + 0.5 s delay
    assert s.deliver_at(0.0, 500) == pytest.approx(2.0)  # queued behind the first
    assert s.deliver_at(10.0, 0) == pytest.approx(10.5)
    j = Shaper(bps=1e9, delay_s=0.01, jitter_s=0.05, seed=3)
    times = [j.deliver_at(t * 1e-3, 10) for t in range(200)]
    assert times == sorted(times) and max(t - i * 1e-3 for i, t in enumerate(times)) <= 0.0601


def test_shaper_outages_hold_delivery_until_the_link_is_back() -> None:
    s = Shaper(bps=1e9, delay_s=0.0, outage_every_s=10.0, outage_s=2.0)
    assert s.deliver_at(1.0, 1) == pytest.approx(1.0, abs=1e-6)
    assert s.deliver_at(8.5, 1) == pytest.approx(10.0)  # down from 8 s to 10 s


async def _sink_server():
    """A TCP server that records when each byte count arrived and echoes a one-byte ack per 'x'."""
    arrivals: list[tuple[float, int]] = []

    async def on_client(reader, writer):
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            arrivals.append((time.monotonic(), total))
            if data.endswith(b"x"):
                writer.write(b"!")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, arrivals


async def test_proxy_shapes_real_bytes_both_ways() -> None:
    server, arrivals = await _sink_server()
    port = server.sockets[0].getsockname()[1]
    profile = LinkProfile("t", up_bps=4e6, down_bps=50e6, rtt_s=0.060)
    async with LinkProxy("127.0.0.1", port, profile) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        t0 = time.monotonic()  # a ping: one RTT
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        rtt = time.monotonic() - t0
        t0 = time.monotonic()  # 200 kB up at 4 Mbit/s: 0.4 s on the wire + 30 ms
        writer.write(b"a" * 200_000)
        await writer.drain()
        while not arrivals or arrivals[-1][1] < 200_001:
            await asyncio.sleep(0.005)
        upload = arrivals[-1][0] - t0
        writer.close()
        assert proxy.bytes_up == 200_001
    server.close()
    assert 0.058 <= rtt < 0.12
    assert 0.42 <= upload < 0.6


async def test_shaped_link_waits_like_the_wire() -> None:
    class Echo:
        async def exchange(self, uplink, req):
            return b"r" * 1000

    link = ShapedEdge(Echo(), LinkProfile("t", up_bps=8e5, down_bps=8e6, rtt_s=0.040))
    t0 = time.monotonic()
    await link.exchange(b"u" * 10_000, None)  # 100 ms up + 1 ms down + 40 ms RTT
    assert 0.140 <= time.monotonic() - t0 < 0.2
