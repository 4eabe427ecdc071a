"""The offline stand-in for Jaeger all-in-one: OTLP/HTTP in on :4318, Jaeger's query API out on :16686.

Runs in the draftwire image (aiohttp and the OTLP protobufs are already there). It keeps the most recent
spans in memory and answers the read-only subset of Jaeger's HTTP API that scripts and tests use, in Jaeger's
JSON shape, so a check written against it also runs against the real Jaeger:
    GET /api/services                       {"data": [service names]}
    GET /api/traces?service=S&limit=N       {"data": [trace, ...]}, newest first
    GET /api/traces/<trace id>              {"data": [trace]} (404 when unknown)
There is no UI: http://localhost:16686/ says so.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import zlib
from collections import OrderedDict

from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

MAX_TRACES = 10_000  # oldest traces are dropped beyond this, as Jaeger's in-memory store does


def _value(v):
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


def _tags(kvs) -> list[dict]:
    return [{"key": kv.key, "type": "string", "value": _value(kv.value)} for kv in kvs]


def jaeger_spans(body: bytes) -> list[dict]:
    """One OTLP export request as Jaeger-shaped spans, each with its service in "process"."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = _tags(rs.resource.attributes)
        service = next((t["value"] for t in resource if t["key"] == "service.name"), "unknown")
        for ss in rs.scope_spans:
            for s in ss.spans:
                refs = [{"refType": "CHILD_OF", "traceID": s.trace_id.hex(), "spanID": s.parent_span_id.hex()}]
                out.append({
                    "traceID": s.trace_id.hex(), "spanID": s.span_id.hex(), "operationName": s.name,
                    "references": refs if s.parent_span_id else [],
                    "startTime": s.start_time_unix_nano // 1000,
                    "duration": (s.end_time_unix_nano - s.start_time_unix_nano) // 1000,
                    "tags": _tags(s.attributes), "process": {"serviceName": service, "tags": resource},
                })
    return out


def as_trace(trace_id: str, spans: list[dict]) -> dict:
    """Jaeger's trace shape: spans point at a process id, the processes are listed once."""
    processes: dict[str, dict] = {}
    out = []
    for span in spans:
        key = next((k for k, p in processes.items() if p == span["process"]), f"p{len(processes) + 1}")
        processes[key] = span["process"]
        out.append({**{k: v for k, v in span.items() if k != "process"}, "processID": key})
    return {"traceID": trace_id, "spans": out, "processes": processes, "warnings": None}


class Store:
    def __init__(self) -> None:
        self.traces: OrderedDict[str, list[dict]] = OrderedDict()

    def add(self, spans: list[dict]) -> None:
        for span in spans:
            self.traces.setdefault(span["traceID"], []).append(span)
            self.traces.move_to_end(span["traceID"])
        while len(self.traces) > MAX_TRACES:
            self.traces.popitem(last=False)


def _decompress(body: bytes, encoding: str) -> bytes:
    if body[:2] == b"\x1f\x8b":  # aiohttp may have inflated it already: trust the magic bytes
        return gzip.decompress(body)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return body
    return body


def collector(store: Store) -> web.Application:
    async def export(request: web.Request) -> web.Response:
        body = _decompress(await request.read(), request.headers.get("Content-Encoding", "").lower())
        try:
            store.add(jaeger_spans(body))
        except DecodeError as exc:
            return web.Response(status=400, text=f"bad OTLP payload: {exc!r}")
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/traces", export)
    return app


def query(store: Store) -> web.Application:
    async def index(_: web.Request) -> web.Response:
        return web.Response(text=__doc__)

    async def services(_: web.Request) -> web.Response:
        names = sorted({s["process"]["serviceName"] for spans in store.traces.values() for s in spans})
        return web.json_response({"data": names, "total": len(names)})

    async def traces(request: web.Request) -> web.Response:
        service = request.query.get("service")
        limit = int(request.query.get("limit", "20"))
        found = [as_trace(tid, spans) for tid, spans in reversed(store.traces.items())
                 if service is None or any(s["process"]["serviceName"] == service for s in spans)]
        return web.json_response({"data": found[:limit], "total": len(found[:limit])})

    async def trace(request: web.Request) -> web.Response:
        tid = request.match_info["trace_id"].lower().rjust(32, "0")
        if tid not in store.traces:
            return web.json_response({"data": None, "errors": [{"code": 404, "msg": "trace not found"}]},
                                     status=404)
        return web.json_response({"data": [as_trace(tid, store.traces[tid])]})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/services", services)
    app.router.add_get("/api/traces", traces)
    app.router.add_get("/api/traces/{trace_id}", trace)
    return app


async def serve(host: str, otlp_port: int, query_port: int) -> None:
    store = Store()
    runners = []
    for app, port in ((collector(store), otlp_port), (query(store), query_port)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
    print(f"trace receiver: OTLP/HTTP on :{otlp_port}, Jaeger query API on :{query_port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--otlp-port", type=int, default=4318)
    p.add_argument("--query-port", type=int, default=16686)
    args = p.parse_args()
    asyncio.run(serve(args.host, args.otlp_port, args.query_port))


if __name__ == "__main__":
    main()
