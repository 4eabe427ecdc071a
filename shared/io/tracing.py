"""OpenTelemetry setup: OTLP/HTTP export when an endpoint is configured, nothing at all otherwise.

Endpoint semantics (verified in opentelemetry-exporter-otlp-proto-http 1.45, per the OTel spec):
`OTEL_EXPORTER_OTLP_ENDPOINT` is a *base* URL and the exporter appends `/v1/traces`;
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` and the constructor's `endpoint=` are used verbatim. We therefore
build the exporter without `endpoint=` so both variables (and their HEADERS/COMPRESSION siblings) work.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

_providers: dict[tuple[str, str | None], TracerProvider] = {}
_global_set = False


def tracing_enabled() -> bool:
    """Export only when an OTLP endpoint is configured and the SDK is not disabled."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(service_name: str, instance: str | None = None) -> trace.Tracer:
    """A tracer for `service_name` (resource service.name / service.instance.id).

    One TracerProvider per (service, instance), cached, so calling twice is harmless and several services
    can run in one process (`draftwire up`) yet export under their own service.name. The first provider
    also becomes the global one, for libraries that call trace.get_tracer(). Without an endpoint this
    returns the API's no-op tracer: no SDK objects, no threads, no export; it still forwards a remote parent
    context, so a trace passes through an untraced service unbroken.
    """
    global _global_set
    if not tracing_enabled():
        return trace.NoOpTracer()
    key = (service_name, instance)
    provider = _providers.get(key)
    if provider is None:
        # Imported lazily: the SDK and exporter (requests, protobuf) cost nothing when tracing is off.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attrs = {"service.name": service_name}
        if instance:
            attrs["service.instance.id"] = instance
        provider = TracerProvider(resource=Resource.create(attrs))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _providers[key] = provider
        if not _global_set:
            trace.set_tracer_provider(provider)
            _global_set = True
    return provider.get_tracer("draftwire." + service_name)


def force_flush(timeout_ms: int = 5000) -> bool:
    """Export everything buffered now (e.g. before a test inspects the collector)."""
    return all(p.force_flush(timeout_ms) for p in _providers.values())


def shutdown_tracing() -> None:
    """Flush and stop all exporters; call at service exit or the last <=5 s of spans are lost.

    Blocking (synchronous HTTP, up to the exporter timeout): from async code whose own event loop serves
    the collector (tests), use `await asyncio.to_thread(shutdown_tracing)`.
    Safe to call repeatedly or when tracing was never enabled. A later setup_tracing() builds fresh
    providers (the global provider cannot be replaced, but our tracers do not go through it).
    """
    providers = list(_providers.values())
    _providers.clear()
    for provider in providers:
        provider.shutdown()
