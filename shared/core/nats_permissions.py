"""Who may publish and subscribe to what: one permission set per role, and the server config that enforces it.

Identities are NATS users authenticated by nkeys (an Ed25519 key pair; the server holds only the public key and
checks a signed nonce), each with publish/subscribe allow-lists in the server's `authorization` block. Why
nkeys in a static config rather than operator/account JWTs: the whole policy is one readable file generated
from this module, nothing else (no `nsc`, no resolver) has to run beside the server, and adding a client is a
config reload. Tenants share one account and are kept apart by subjects that only their owner may use:
a client named T publishes only `prompts.T`, `submit.T`, `cancel.T.*` and subscribes only to `results.T.*`,
`stream.T.*` and its own inbox prefix `_INBOX.T` (every identity gets `_INBOX.<name>`; nats-py's
`inbox_prefix`). A device named D hears jobs, session pings and cancels only under `dev.D.>` and sends its
stream chunks as `dev.D.chunk.<session>`, which the scheduler relays to the tenant: no device reads another's
sessions, and the only session ids it learns (the 64-bit capabilities its verify rounds and results name)
are those of the jobs placed on it. The edge roles answer requests through `allow_responses` (a reply only to a request they
received), so nobody but the scheduler can publish into another identity's inbox.

Pure: role name in, allow-lists out; `draftwire.shared.io.credentials` writes keys and files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from draftwire.shared.core.subject_names import (
    DELIVERED_BUCKET,
    DONE_STREAM,
    JOBS_STREAM,
    ROOT,
    SUBMIT_STREAM,
    VOCAB_BUCKET,
)

ROLES = ("admin", "scheduler", "edge", "device", "telemetry", "client")
SERVICE_OF_ROLE = {"scheduler": "draftwire-scheduler", "edge": "draftwire-verifier", "device": "draftwire-draft",
                   "telemetry": "draftwire-telemetry"}  # each role's nats.micro service (its `$SRV` subjects)
# JetStream: the streams the scheduler owns (the KV bucket's stream is KV_<bucket>)
STREAMS = (JOBS_STREAM, SUBMIT_STREAM, DONE_STREAM, f"KV_{DELIVERED_BUCKET}")


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False  # may reply to the requests it receives (and only to those)


def inbox_prefix(name: str) -> str:
    """The reply-subject prefix of identity `name`: only it may subscribe below it."""
    return f"_INBOX.{name}"


def _micro(service: str) -> tuple[str, ...]:
    """What a nats.micro service subscribes to: `$SRV.<verb>`, `$SRV.<verb>.<name>`, `$SRV.<verb>.<name>.<id>`."""
    return ("$SRV.*", f"$SRV.*.{service}", f"$SRV.*.{service}.*")


def _self_ping(role: str) -> tuple[str, ...]:
    """Its own service's `$SRV.PING`: the container health check signs in as the service (services/probe.py)."""
    return (f"$SRV.PING.{SERVICE_OF_ROLE[role]}",)


def _jetstream_owner() -> tuple[str, ...]:
    """The JetStream API calls the scheduler makes on its own streams: create/update/info, read one message,
    delete a cancelled queued job, its durable pull consumers, acks, and the delivered-reply KV. No delete or
    purge of streams or consumers: nobody but `admin` can stop the queue."""
    subjects = ["$JS.API.INFO", f"$KV.{DELIVERED_BUCKET}.>"]
    for s in STREAMS:
        subjects += [f"$JS.API.STREAM.CREATE.{s}", f"$JS.API.STREAM.UPDATE.{s}", f"$JS.API.STREAM.INFO.{s}",
                     f"$JS.API.STREAM.MSG.GET.{s}", f"$JS.API.DIRECT.GET.{s}", f"$JS.API.DIRECT.GET.{s}.>",
                     f"$JS.API.CONSUMER.CREATE.{s}.>", f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.*",
                     f"$JS.API.CONSUMER.INFO.{s}.*", f"$JS.API.CONSUMER.MSG.NEXT.{s}.*", f"$JS.ACK.{s}.>"]
    subjects.append(f"$JS.API.STREAM.MSG.DELETE.{JOBS_STREAM}")
    return tuple(subjects)


_VOCAB_STREAM = f"OBJ_{VOCAB_BUCKET}"  # the target tokenizers' object store (nats-py names its stream so)


def _vocab_reader() -> tuple[str, ...]:
    """Fetch one object from the tokenizer store: bind (info), its metadata (last message by subject), an
    ordered consumer over its chunks (nats-py looks its stream up by subject: STREAM.NAMES, which lists
    stream names only) and that consumer's flow control. Nothing that writes or deletes."""
    s = _VOCAB_STREAM
    return ("$JS.API.STREAM.NAMES", f"$JS.API.STREAM.INFO.{s}", f"$JS.API.STREAM.MSG.GET.{s}", f"$JS.API.DIRECT.GET.{s}",
            f"$JS.API.DIRECT.GET.{s}.>", f"$JS.API.CONSUMER.CREATE.{s}", f"$JS.API.CONSUMER.CREATE.{s}.>",
            f"$JS.FC.{s}.>")


def _vocab_writer() -> tuple[str, ...]:
    """The edge stores its target's tokenizer: create the (bounded) bucket, read, write objects, purge the
    chunks of an object it replaces. No delete of the bucket."""
    s = _VOCAB_STREAM
    return (*_vocab_reader(), f"$JS.API.STREAM.CREATE.{s}", f"$JS.API.STREAM.PURGE.{s}", f"$O.{VOCAB_BUCKET}.>")


def _in_any_domain(subjects: Iterable[str]) -> tuple[str, ...]:
    """The same JetStream API calls addressed to a domain (`$JS.<domain>.API...`): how a device behind a leaf
    node reaches the edge's JetStream (shared/io/nats_leaf.py); the edge checks the subject as it crosses."""
    return tuple(s.replace("$JS.API.", "$JS.*.API.", 1) for s in subjects if s.startswith("$JS.API."))


def role_permissions(role: str, name: str) -> Permissions:
    """The allow-lists of identity `name` acting as `role` (for a client, `name` is its tenant)."""
    inbox = (f"{inbox_prefix(name)}.>",)
    if role == "admin":
        return Permissions((">",), (">",), allow_responses=True)
    if role == "client":
        return Permissions(
            publish=(f"{ROOT}.prompts.{name}", f"{ROOT}.submit.{name}", f"{ROOT}.cancel.{name}.*",
                     f"{ROOT}.verifier.info"),  # which model serves it (the gateway's /v1/models)
            subscribe=(*inbox, f"{ROOT}.results.{name}.*", f"{ROOT}.stream.{name}.*"),
        )
    if role == "scheduler":
        return Permissions(
            publish=(f"{ROOT}.jobs.>", f"{ROOT}.results.>", f"{ROOT}.stream.>", f"{ROOT}.draft.start",
                     f"{ROOT}.draft.start.*", f"{ROOT}.draft.session.*", f"{ROOT}.dev.*.start.*",
                     f"{ROOT}.dev.*.session.*", f"{ROOT}.dev.*.cancel.*", f"{ROOT}.scheduler.sessions.*", "_INBOX.>",
                     f"{ROOT}.events.request",  # the requests it refuses itself
                     "$SRV.STATS.draftwire-draft", "$SRV.STATS.draftwire-verifier", *_jetstream_owner(),
                     *_self_ping(role)),
            subscribe=(*inbox, f"{ROOT}.prompts", f"{ROOT}.prompts.*", f"{ROOT}.cancel.>", f"{ROOT}.done.*",
                       f"{ROOT}.dev.*.chunk.*",
                       f"{ROOT}.scheduler.sessions", f"{ROOT}.scheduler.sessions.*", *_micro(SERVICE_OF_ROLE[role])),
            allow_responses=True,
        )
    if role == "edge":
        return Permissions(
            publish=(*_self_ping(role), *_vocab_writer()),
            subscribe=(*inbox, f"{ROOT}.verify", f"{ROOT}.verify.*", f"{ROOT}.verifier.info",
                       f"{ROOT}.verifier.drain.*",  # drain requests (`draftwire drain`: only admin may send one)
                       f"{ROOT}.sessions.close", *_micro(SERVICE_OF_ROLE[role])),
            allow_responses=True,
        )
    if role == "device":  # everything it is told arrives under its own prefix (`Subjects.device_prefix`)
        jetstream = (f"$JS.API.STREAM.INFO.{DONE_STREAM}", *_vocab_reader())
        return Permissions(
            publish=(f"{ROOT}.verify", f"{ROOT}.verify.*", f"{ROOT}.verifier.info", f"{ROOT}.sessions.close",
                     f"{ROOT}.events.round", f"{ROOT}.events.request", f"{ROOT}.dev.{name}.chunk.*",
                     f"{ROOT}.done.*", "$SRV.STATS.draftwire-verifier", "$SRV.PING.draftwire-verifier.*",
                     *_self_ping(role), *jetstream, *_in_any_domain(jetstream)),
            subscribe=(*inbox, f"{ROOT}.dev.{name}.>", *_micro(SERVICE_OF_ROLE[role])),
            allow_responses=True,
        )
    if role == "telemetry":  # gathers the loads the drafts and verifiers report (sessions in flight, queues)
        return Permissions(
            publish=("$SRV.STATS.draftwire-draft", "$SRV.STATS.draftwire-verifier", *_self_ping(role)),
            subscribe=(*inbox, f"{ROOT}.events.>", f"{ROOT}.telemetry.stats", *_micro(SERVICE_OF_ROLE[role])),
            allow_responses=True,
        )
    raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


def _quoted(subjects: Iterable[str]) -> str:
    return ", ".join(f'"{s}"' for s in subjects)


def authorization_block(users: Iterable[tuple[str, str, str]]) -> str:
    """nats-server config: one nkey user per (public key, role, name), with that role's permissions.

    An allow-list denies everything not on it; an empty publish list allows no publish (responses aside).
    """
    lines = ["authorization {", "  users = ["]
    for public_key, role, name in users:
        p = role_permissions(role, name)
        publish = f"publish: {{allow: [{_quoted(p.publish)}]}}" if p.publish else 'publish: {deny: [">"]}'
        responses = ", allow_responses: true" if p.allow_responses else ""
        lines.append(f"    {{nkey: {public_key}, permissions: {{{publish}, "
                     f"subscribe: {{allow: [{_quoted(p.subscribe)}]}}{responses}}}}}  # {role} {name}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


__all__ = ["ROLES", "Permissions", "authorization_block", "inbox_prefix", "role_permissions"]
