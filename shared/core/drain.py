"""Draining an instance for maintenance: it takes no new session, finishes or hands over those it holds, then idles.

An operator (`draftwire drain`, or anyone allowed to publish there: `admin` when secured) sends a JSON request to
the instance's own subject, `draftwire.verifier.drain.<instance>` or `<draft prefix>.drain.<instance>`:
`{"action": "drain" | "status" | "resume", "grace_s": seconds}`; an empty body is a drain with no grace limit.
The reply is the instance's `DrainStatus`. A draining instance reports `draining` in its `$SRV.STATS` load, so
placement (`draftwire.shared.core.placement`) sends new sessions elsewhere, and it leaves its queue groups.

A draining verifier serves the sessions it holds until they end or `grace_s` passes; after that (at once with
`grace_s` 0) every round is answered `draining`, the device moves the session to another verifier and resends
its history there, exactly as after a failover, and the verifier drops the KV caches it still holds. A round of
a session it does not hold (a new session placed before the drain was seen) is answered `draining` at any time.
Drained (nothing held, nothing in flight), it stays up and idle, answering pings and stats, until it is resumed
or stopped: exiting would only have a supervisor (compose's `restart: unless-stopped`, `draftwire up`) start it
again undrained. A draft finishes its generations (they cannot move without being re-run); `grace_s` is ignored.

Pure: the state and the wire format; the services hold the I/O.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from draftwire.shared.core.subject_names import ROOT, validate_token

DRAINING = "draining"  # the ErrorReply code of a round a draining verifier will not serve
DRAINING_HEADER = "Draftwire-Draining"  # on that reply: the device moves the session as after a failover
ACTIONS = ("drain", "status", "resume")


def verifier_drain_subject(instance: str) -> str:
    return f"{ROOT}.verifier.drain.{validate_token(instance, 'verifier instance')}"


def draft_drain_subject(instance: str, prefix: str) -> str:
    """Under the draft's device prefix (`Subjects.device_prefix`), which a secured device may subscribe to."""
    return f"{prefix}.drain.{validate_token(instance, 'draft instance')}"


@dataclass(frozen=True)
class DrainCommand:
    action: str = "drain"
    grace_s: float = math.inf  # how long held sessions may keep being served before they are handed over


def parse_command(data: bytes) -> DrainCommand:
    """A drain request; ValueError (with the reason) for anything else."""
    if not data.strip():
        return DrainCommand()
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"a drain request is a JSON object: {exc}") from None
    if not isinstance(obj, dict) or set(obj) - {"action", "grace_s"}:
        raise ValueError("a drain request is a JSON object with `action` and `grace_s` only")
    action = obj.get("action", "drain")
    grace = obj.get("grace_s", math.inf)
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    if grace is None:
        grace = math.inf
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise ValueError(f"grace_s must be a number >= 0 (or null: no limit), got {grace!r}")
    return DrainCommand(action, float(grace))


@dataclass
class DrainState:
    """Serving, or draining since `since` (monotonic seconds) with held sessions served until `since + grace_s`."""

    since: float | None = None
    grace_s: float = math.inf

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self, now: float, grace_s: float = math.inf) -> None:
        """Start draining; a repeated drain keeps its start and may only shorten the grace."""
        if self.since is None:
            self.since, self.grace_s = now, grace_s
        else:
            self.grace_s = min(self.grace_s, grace_s)

    def resume(self) -> None:
        self.since, self.grace_s = None, math.inf

    def handing_over(self, now: float) -> bool:
        """The grace is over: held sessions move at their next round."""
        return self.since is not None and now - self.since >= self.grace_s

    def admits(self, held: bool, now: float) -> bool:
        """Whether a round is served here: always when serving; draining, only a held session's, in the grace."""
        return self.since is None or (held and not self.handing_over(now))

    def grace_left(self, now: float) -> float | None:
        if self.since is None or math.isinf(self.grace_s):
            return None
        return max(0.0, self.since + self.grace_s - now)


@dataclass(frozen=True)
class DrainStatus:
    """The drain reply: `sessions` held (a verifier's KV caches, a draft's generations), `in_flight` requests
    being answered; `drained` once draining with neither."""

    instance: str
    draining: bool
    sessions: int
    in_flight: int
    grace_left_s: float | None = None

    @property
    def drained(self) -> bool:
        return self.draining and self.sessions == 0 and self.in_flight == 0

    def encode(self) -> bytes:
        return json.dumps({**asdict(self), "drained": self.drained}).encode()

    @classmethod
    def decode(cls, data: bytes) -> DrainStatus:
        """ValueError for anything but a drain reply (an error reply `{"error": ...}` included, with its message)."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a drain reply: {exc}") from None
        error = obj.get("error") if isinstance(obj, dict) else None
        if error is not None:
            raise ValueError(f"the instance refused: {error.get('message', error) if isinstance(error, dict) else error}")
        try:
            grace = obj.get("grace_left_s")
            return cls(str(obj["instance"]), bool(obj["draining"]), int(obj["sessions"]), int(obj["in_flight"]),
                       None if grace is None else float(grace))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a drain reply: {exc!r}") from None


def error_reply(message: str) -> bytes:
    return json.dumps({"error": {"code": "bad_request", "message": message}}).encode()


__all__ = ["ACTIONS", "DRAINING", "DRAINING_HEADER", "DrainCommand", "DrainState", "DrainStatus",
           "draft_drain_subject", "error_reply", "parse_command", "verifier_drain_subject"]
