"""Leave and rejoin some endpoints of a running nats.micro service (what a drained instance does with its queue
groups): NATS then routes those subjects to the other members only, or answers "no responders", while the
service keeps answering `$SRV.PING|INFO|STATS` and its other endpoints.

nats-py's micro `Service` can only stop every endpoint at once, so this reaches into its endpoint list (pinned
by the nats-py version in pyproject; tests/test_drain.py fails if it changes). `drain_endpoint` is the drain
subject's handler, the same for every service that drains.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from nats.micro import Request, Service

from draftwire.shared.core.drain import DrainStatus, error_reply, parse_command
from draftwire.shared.io.bus import flush


async def leave(svc: Service, subjects: Collection[str]) -> list[dict]:
    """Unsubscribe the endpoints serving `subjects`; returns what `rejoin` needs to add them back."""
    left = []
    for endpoint in list(svc._endpoints):
        if endpoint._subject in subjects:
            await endpoint._stop()
            svc._endpoints.remove(endpoint)
            left.append({"name": endpoint._name, "subject": endpoint._subject, "handler": endpoint._handler,
                         "queue_group": endpoint._queue_group, "metadata": endpoint._metadata})
    await flush(svc._client)  # the server has the unsubscription before the caller says it left
    return left


async def rejoin(svc: Service, left: list[dict]) -> None:
    for config in left:
        await svc.add_endpoint(**config)
    await flush(svc._client)


def drain_endpoint(
    on_drain: Callable[[float], Awaitable[None]], on_resume: Callable[[], Awaitable[None]],
    status: Callable[[], DrainStatus],
) -> Callable[[Request], Awaitable[None]]:
    """A handler for `draftwire.<service>.drain.<instance>`: a bad command gets an error reply; `drain` runs
    `on_drain(grace_s)` and `resume` runs `on_resume()` (each the service's own steps); the reply is `status()`."""

    async def handle(req: Request) -> None:
        try:
            command = parse_command(req.data)
        except ValueError as exc:
            await req.respond(error_reply(str(exc)))
            return
        if command.action == "drain":
            await on_drain(command.grace_s)
        elif command.action == "resume":
            await on_resume()
        await req.respond(status().encode())

    return handle


__all__ = ["drain_endpoint", "leave", "rejoin"]
