"""Per-role NATS identities on disk: one nkey seed file per identity, and the server config that admits them.

A secure directory holds `<name>.nk` (the identity's nkey seed: what nats-py's `nkeys_seed` reads; mode 0600),
`roles.json` (name -> role) and `auth.conf` (the nats-server `authorization` block built from the public keys
by `draftwire.shared.core.nats_permissions`). The fixed identities are named after their roles (`scheduler.nk`,
`edge.nk`, `device.nk`, `telemetry.nk`, `admin.nk`) plus a first client, `client.nk`; `add_client` adds
another tenant. Files are created once and reused, so restarting keeps every identity.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import nkeys

from draftwire.shared.core.nats_permissions import ROLES, authorization_block, inbox_prefix

FIXED = ("admin", "scheduler", "edge", "device", "telemetry")
FIRST_CLIENT = "client"
GATEWAY = "gateway"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # a subject token and a file name


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"identity name {name!r}: use 1-63 letters, digits, '-' or '_', starting alphanumeric")
    return name


@dataclass(frozen=True)
class Identity:
    """One identity's seed file; its name is the file's stem (and, for a client, its tenant)."""

    path: Path

    @property
    def name(self) -> str:
        return validate_name(self.path.stem)

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix(self.name)

    def public_key(self) -> str:
        return nkeys.from_seed(bytearray(self.path.read_bytes().strip())).public_key.decode()

    def connect_options(self) -> dict:
        """What nats-py's connect needs to be this identity."""
        return {"nkeys_seed": str(self.path), "inbox_prefix": self.inbox_prefix}


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """The identity in a seed file, checked (a clear error for a missing or malformed file)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"credentials file {p} does not exist")
    identity = Identity(p)
    try:
        identity.public_key()
    except Exception as exc:  # noqa: BLE001 - nkeys raises its own error types
        raise ValueError(f"{p} is not an nkey seed file: {type(exc).__name__}") from None
    return identity


def identity_name(creds: str | os.PathLike[str] | None) -> str:
    """Who a process signs in as: its credentials file's identity name ("" without credentials). A client's
    is its tenant, a device's the prefix of its subjects."""
    return load_identity(creds).name if creds else ""


def _write_seed(path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")


def _roles(directory: Path) -> dict[str, str]:
    path = directory / "roles.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(directory: Path, roles: dict[str, str]) -> None:
    (directory / "roles.json").write_text(json.dumps(roles, indent=2, sort_keys=True) + "\n")
    users = [(Identity(directory / f"{name}.nk").public_key(), role, name) for name, role in sorted(roles.items())]
    (directory / "auth.conf").write_text(authorization_block(users))


def _add(directory: Path, roles: dict[str, str], name: str, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    path = directory / f"{validate_name(name)}.nk"
    if not path.exists():
        _write_seed(path)
    roles[name] = role


def ensure_credentials(directory: str | os.PathLike[str]) -> Path:
    """Create (or reuse) the fixed identities and the first client in `directory`; returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    roles = _roles(d)
    for name in FIXED:
        _add(d, roles, name, name)
    if not any(name != GATEWAY and role == "client" for name, role in roles.items()):
        _add(d, roles, FIRST_CLIENT, "client")
    if GATEWAY not in roles:  # the OpenAI-compatible gateway is a client: its HTTP callers are one tenant
        _add(d, roles, GATEWAY, "client")
    _save(d, roles)
    return d


def add_identity(directory: str | os.PathLike[str], name: str, role: str = "client") -> Path:
    """Add identity `name` acting as `role` (a client is a tenant; a device, another device's drafts): its
    seed file, and `auth.conf` rewritten to admit it. Returns the file."""
    d = ensure_credentials(directory)
    roles = _roles(d)
    if roles.get(name, role) != role:
        raise ValueError(f"{name!r} is already the {roles[name]} identity")
    _add(d, roles, name, role)
    _save(d, roles)
    return d / f"{name}.nk"


def add_client(directory: str | os.PathLike[str], name: str) -> Path:
    return add_identity(directory, name, "client")


def server_authorization(directory: str | os.PathLike[str]) -> str:
    """The nats-server `authorization` block for the identities in `directory`."""
    return (Path(directory) / "auth.conf").read_text()


def identity_file(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / f"{validate_name(name)}.nk"


__all__ = ["Identity", "add_client", "add_identity", "ensure_credentials", "identity_file", "identity_name",
           "load_identity", "server_authorization", "validate_name"]
