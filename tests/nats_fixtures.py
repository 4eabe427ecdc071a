"""pytest fixtures: a real nats-server (JetStream on) per test, and a client connected to it.

Import into conftest.py with `from tests.nats_fixtures import *`. A fresh server per test costs ~50 ms and
keeps JetStream state (streams, durable consumers) from leaking between tests.
"""

from __future__ import annotations

import pytest_asyncio

from draftwire.shared.io.bus import connect
from draftwire.shared.io.nats_server import EmbeddedNats

__all__ = ["nats_server", "nc"]


@pytest_asyncio.fixture
async def nats_server(tmp_path):
    async with EmbeddedNats(store_dir=tmp_path / "jetstream") as server:
        yield server


@pytest_asyncio.fixture
async def nc(nats_server):
    client = await connect(nats_server.url, name="pytest")
    try:
        yield client
    finally:
        await client.close()
