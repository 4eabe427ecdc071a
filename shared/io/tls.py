"""TLS between the services and NATS: development certificates, the client context, the server's tls block.

Production uses certificates the user provides (any CA nats-server and Python's ssl accept); this module only
makes a throwaway dev CA so that TLS is on by default and tested end to end. Keys are ECDSA P-256: generating
one takes well under a millisecond (RSA-2048 takes ~50 ms), and both Go and OpenSSL accept them everywhere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "nats")
"""Loopback for `draftwire up`, `nats` for the compose service name."""

CA_DAYS = 3650
CERT_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=1)  # a cert expiring within a day is regenerated, not reused
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TLS_TIMEOUT_S = 5.0  # nats-server's handshake timeout; its 2 s default is tight over a cell-edge radio link


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths: the CA to trust, and a certificate with its private key (the server's, or a client's)."""

    ca: Path
    cert: Path
    key: Path


def make_dev_certs(dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> TlsFiles:
    """A dev CA (ca.pem, ca-key.pem) and a server cert (server.pem, server-key.pem) for `hosts`, in `dir`.

    Reused when still valid, so every service started from the same dir trusts the same CA: the CA is
    kept unless missing or expiring; the server cert is kept unless missing, expiring, not signed by that CA,
    not matching its key, or made for other hosts. A ca.pem without its ca-key.pem is not ours to replace.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key = _load_or_make_ca(dir)
    files = TlsFiles(dir / "ca.pem", dir / "server.pem", dir / "server-key.pem")
    sans = _sans(hosts)
    if not _reusable(files.cert, files.key, ca_cert, sans):
        _write_leaf(files.cert, files.key, ca_cert, ca_key, hosts[0], sans, ExtendedKeyUsageOID.SERVER_AUTH)
    return files


def make_client_cert(dir: Path, name: str) -> TlsFiles:
    """A client cert `name.pem`/`name-key.pem` signed by the dev CA in `dir`, for mutual TLS (`verify: true`)."""
    dir = Path(dir)
    if name in ("ca", "server") or name.endswith("-key") or not _NAME.fullmatch(name):
        raise ValueError(f"bad client certificate name {name!r}")
    if not (dir / "ca-key.pem").exists():
        make_dev_certs(dir)
    ca_cert, ca_key = _load_or_make_ca(dir)
    files = TlsFiles(dir / "ca.pem", dir / f"{name}.pem", dir / f"{name}-key.pem")
    if not _reusable(files.cert, files.key, ca_cert, None):
        _write_leaf(files.cert, files.key, ca_cert, ca_key, name, None, ExtendedKeyUsageOID.CLIENT_AUTH)
    return files


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """An ssl context for `nats.connect(url, tls=ctx)` that trusts only `ca`; `cert`/`key` for mutual TLS.

    The server's name is checked against the URL's host; pass `tls_hostname=` to nats.connect when the
    URL's host is not among the certificate's names (e.g. an IP address for a cert made for `nats`).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    elif key is not None:
        raise ValueError("a TLS key without its certificate")
    return ctx


def server_tls_block(files: TlsFiles, verify_clients: bool = False, timeout: float = TLS_TIMEOUT_S) -> str:
    """nats-server's `tls { ... }` config text; `verify_clients` requires a client cert signed by `files.ca`."""
    lines = [
        f"  cert_file: {_quote(files.cert)}",
        f"  key_file: {_quote(files.key)}",
        f"  ca_file: {_quote(files.ca)}",
        f"  timeout: {float(timeout)}",
    ]
    if verify_clients:
        lines.append("  verify: true")
    return "tls {\n" + "\n".join(lines) + "\n}\n"


def cert_hosts(cert: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for (its subjectAltName)."""
    san = x509.load_pem_x509_certificate(Path(cert).read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    return [str(v) for v in san.value.get_values_for_type(x509.IPAddress)] + san.value.get_values_for_type(
        x509.DNSName
    )


def _quote(path: Path) -> str:
    """nats-server config strings accept JSON's double-quoted form; absolute so the config's dir is moot."""
    return json.dumps(str(Path(path).resolve()))


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fresh(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc > now + RENEW_BEFORE


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*der) == key.public_key().public_bytes(*der)


def _load_or_make_ca(dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = dir / "ca.pem", dir / "ca-key.pem"
    if cert_path.exists():
        if not key_path.exists():
            raise ValueError(
                f"{cert_path} exists without ca-key.pem: a CA provided by you, not replaced; "
                "use an empty directory for development certificates"
            )
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not _same_key(cert, key):
            raise ValueError(f"{key_path} is not the key of {cert_path}")
        if _fresh(cert):
            return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "draftwire development CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _reusable(cert_path: Path, key_path: Path, ca: x509.Certificate, sans: list | None) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if not (_fresh(cert) and _same_key(cert, key)):
        return False
    if sans is None:
        return True
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(have) == set(sans)


def _write_leaf(cert_path, key_path, ca_cert, ca_key, common_name, sans, usage) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), CERT_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(aki, critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _builder(subject, issuer, public_key, days: int) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate a little clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with `mode` from the start: a reader never sees half a key, nor a key others can read."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
