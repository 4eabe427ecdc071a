"""A tiny in-process OTLP/HTTP trace collector, so tests assert on the real wire format the services export.

Decodes `ExportTraceServiceRequest` protobufs into flat `SpanRecord`s; no Jaeger or collector needed.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import pytest_asyncio
from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

__all__ = ["OtlpReceiver", "SpanRecord", "decode_export", "otlp_receiver"]


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    service_name: str
    kind: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)


def _any_value(v) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, which) if which else None


def _attributes(kvs) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def decode_export(body: bytes) -> list[SpanRecord]:
    """Flatten one OTLP export request into span records (ids as lowercase hex)."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    SpanRecord(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        service_name=str(resource.get("service.name", "")),
                        kind=int(s.kind),
                        attributes=_attributes(s.attributes),
                        resource=resource,
                    )
                )
    return out


def _decompress(body: bytes, encoding: str) -> bytes:
    # aiohttp may already have inflated a Content-Encoding body, so trust the magic bytes, not the header.
    if body[:2] == b"\x1f\x8b":
        return gzip.decompress(body)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return body
    return body


class OtlpReceiver:
    """POST /v1/traces on 127.0.0.1:<free port>. Use as `async with OtlpReceiver() as rx:`."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.requests = 0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        """Base URL, for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = _decompress(await request.read(), request.headers.get("Content-Encoding", "").lower())
        try:
            spans = decode_export(body)
        except DecodeError as exc:  # a malformed export should fail the test visibly, not hang it
            return web.Response(status=400, text=f"bad OTLP payload: {exc!r}")
        self.requests += 1
        self.spans.extend(spans)
        self._changed.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))  # bind first: we learn the port without a probe-then-bind race
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 10.0
    ) -> list[SpanRecord]:
        """Wait until predicate(all spans so far) is true; return the spans. TimeoutError lists what arrived."""
        deadline = time.monotonic() + timeout
        while not predicate(self.spans):
            left = deadline - time.monotonic()
            if left <= 0:
                got = [(s.service_name, s.name) for s in self.spans]
                raise TimeoutError(f"OTLP spans did not satisfy predicate within {timeout}s; got {got}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        return list(self.spans)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest_asyncio.fixture
async def otlp_receiver():
    async with OtlpReceiver() as rx:
        yield rx
