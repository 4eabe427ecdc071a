"""TLS between clients and a real nats-server, with the generated development certificates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl

import nats
import nats.errors
import pytest
from cryptography import x509

from draftwire.services.cli.main import main as cli_main
from draftwire.shared.io.bus import connect
from draftwire.shared.io.nats_server import EmbeddedNats, is_reachable
from draftwire.shared.io.tls import (
    DEFAULT_HOSTS,
    cert_hosts,
    client_context,
    make_client_cert,
    make_dev_certs,
    server_tls_block,
)


async def _noop(*_):
    pass


async def _connect_once(url: str, **kw) -> nats.NATS:
    """One attempt, no retries, no traceback logging: refusals surface as exceptions, fast."""
    return await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2,
                              error_cb=_noop, **kw)  # fmt: skip


async def _roundtrip(nc) -> bytes:
    sub = await nc.subscribe("tls.check")
    await nc.publish("tls.check", b"over tls")
    return (await sub.next_msg(timeout=2)).data


async def _refused(url: str, **kw) -> None:
    """The connection fails, or is closed by the server before a round trip succeeds."""
    with pytest.raises((ssl.SSLError, OSError, nats.errors.Error, asyncio.TimeoutError)):
        nc = await _connect_once(url, **kw)
        try:
            await nc.flush(timeout=2)
            await _roundtrip(nc)
        finally:
            await nc.close()


async def _plaintext_pong(url: str) -> bytes:
    """What a client that never starts TLS gets back for CONNECT + PING (b"" when the server hangs up)."""
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await reader.readline()).startswith(b"INFO ")
        writer.write(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        await writer.drain()
        out = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while b"PONG" not in out and (chunk := await asyncio.wait_for(reader.read(4096), 3)):
                out += chunk
        return out
    finally:
        writer.close()


async def test_tls_roundtrip_and_refusals(tmp_path):
    files = make_dev_certs(tmp_path / "certs")
    other = make_dev_certs(tmp_path / "other")
    async with EmbeddedNats(config_extra=server_tls_block(files)) as server:
        assert await is_reachable(server.url)  # the ready check reads the plaintext INFO before the upgrade
        nc = await connect(server.url, "tls-test", tls=client_context(files.ca))  # the services' connect
        try:
            assert await _roundtrip(nc) == b"over tls"
            assert nc.connected_url.scheme == "nats" and nc._server_info["tls_required"]
        finally:
            await nc.close()
        assert b"PONG" not in await _plaintext_pong(server.url)  # no TLS: the server hangs up
        await _refused(server.url, tls=client_context(other.ca))  # trusts another CA
        await _refused(server.url)  # nats-py's default context: the system CAs, not ours


async def test_plaintext_server_answers_the_plaintext_probe():
    """The probe above would see PONG from a server without TLS: its refusal is TLS, not a broken probe."""
    async with EmbeddedNats() as server:
        assert b"PONG" in await _plaintext_pong(server.url)


async def test_hostname_is_checked(tmp_path):
    """A cert for other names is refused; tls_hostname names the one it was made for."""
    files = make_dev_certs(tmp_path, hosts=("nats",))
    async with EmbeddedNats(config_extra=server_tls_block(files)) as server:
        await _refused(server.url, tls=client_context(files.ca))
        nc = await _connect_once(server.url, tls=client_context(files.ca), tls_hostname="nats")
        try:
            assert await _roundtrip(nc) == b"over tls"
        finally:
            await nc.close()


async def test_mutual_tls(tmp_path):
    files = make_dev_certs(tmp_path / "certs")
    alice = make_client_cert(tmp_path / "certs", "alice")
    stranger = make_client_cert(tmp_path / "other", "stranger")  # signed by another dev CA
    async with EmbeddedNats(config_extra=server_tls_block(files, verify_clients=True)) as server:
        nc = await _connect_once(server.url, tls=client_context(files.ca, alice.cert, alice.key))
        try:
            assert await _roundtrip(nc) == b"over tls"
        finally:
            await nc.close()
        await _refused(server.url, tls=client_context(files.ca))  # no client cert
        await _refused(server.url, tls=client_context(files.ca, stranger.cert, stranger.key))


def test_certs_reused_and_regenerated(tmp_path):
    first = make_dev_certs(tmp_path)
    ca, cert = first.ca.read_bytes(), first.cert.read_bytes()
    assert make_dev_certs(tmp_path) == first
    assert first.ca.read_bytes() == ca and first.cert.read_bytes() == cert  # reused as they were
    first.cert.unlink()
    make_dev_certs(tmp_path)
    assert first.ca.read_bytes() == ca and first.cert.read_bytes() != cert  # same CA, new server cert
    new_cert = first.cert.read_bytes()
    make_dev_certs(tmp_path, hosts=("edge.example",))
    assert first.ca.read_bytes() == ca and first.cert.read_bytes() != new_cert  # other hosts: a new cert
    for key in (first.key, tmp_path / "ca-key.pem"):
        assert os.stat(key).st_mode & 0o777 == 0o600


def test_server_cert_of_another_ca_is_replaced(tmp_path):
    make_dev_certs(tmp_path / "a")
    b = make_dev_certs(tmp_path / "b")
    (tmp_path / "a" / "server.pem").write_bytes(b.cert.read_bytes())
    (tmp_path / "a" / "server-key.pem").write_bytes(b.key.read_bytes())
    files = make_dev_certs(tmp_path / "a")
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    x509.load_pem_x509_certificate(files.cert.read_bytes()).verify_directly_issued_by(ca)


def test_a_ca_without_its_key_is_not_overwritten(tmp_path):
    provided = make_dev_certs(tmp_path / "mine")
    (tmp_path / "mine" / "ca-key.pem").unlink()
    ca = provided.ca.read_bytes()
    with pytest.raises(ValueError, match="without ca-key.pem"):
        make_dev_certs(tmp_path / "mine")
    assert provided.ca.read_bytes() == ca


def test_cert_sans_include_the_hosts(tmp_path):
    assert cert_hosts(make_dev_certs(tmp_path / "d").cert) == list(DEFAULT_HOSTS)
    hosts = ("10.0.0.7", "::1", "edge.example")
    assert sorted(cert_hosts(make_dev_certs(tmp_path / "e", hosts).cert)) == sorted(hosts)


def test_server_tls_block_text(tmp_path):
    files = make_dev_certs(tmp_path)
    block = server_tls_block(files)
    assert block.startswith("tls {") and f'cert_file: "{files.cert}"' in block and "verify" not in block
    assert "verify: true" in server_tls_block(files, verify_clients=True)


def test_certs_cli(tmp_path, capsys):
    assert cli_main(["certs", str(tmp_path), "--host", "edge.example", "--client", "dev1"]) == 0
    out = capsys.readouterr().out
    assert sorted(cert_hosts(tmp_path / "server.pem")) == sorted([*DEFAULT_HOSTS, "edge.example"])
    assert (tmp_path / "dev1.pem").exists() and (tmp_path / "dev1-key.pem").exists()
    for var in ("DRAFTWIRE_TLS_CA", "DRAFTWIRE_TLS_CERT", "DRAFTWIRE_TLS_KEY"):
        assert var in out
    assert str((tmp_path / "ca.pem").resolve()) in out
