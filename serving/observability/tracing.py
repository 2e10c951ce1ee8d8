"""Optional tracing (OpenTelemetry over OTLP/HTTP) and Sentry error reporting.

Both are off unless configured (`otel_exporter_otlp_endpoint`, `sentry_dsn`) and need the
`observability` extra; without it the set-up logs a warning and `job_span` stays a no-op. Spans
of one job share the `svd.job_id` attribute across processes (ingress -> dispatcher -> generator
-> post-processor), which is how a trace backend links them: the queue carries no trace context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from serving.settings import Settings

log = structlog.get_logger(__name__)

_tracer: Any = None  # an opentelemetry Tracer once set up; None = tracing off
_provider: Any = None


def setup_observability(settings: Settings, service: str) -> None:
    """Start tracing and/or Sentry for this process (`service`: api, dispatcher, generator, ...)."""
    global _tracer, _provider
    if settings.otel_exporter_otlp_endpoint:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("tracing_unavailable", reason="install svd-serve[observability]")
        else:
            provider = TracerProvider(
                resource=Resource.create({"service.name": settings.otel_service_name, "svd.process": service})
            )
            endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            trace.set_tracer_provider(provider)
            _provider, _tracer = provider, provider.get_tracer("svd-serve")
            log.info("tracing_enabled", endpoint=endpoint, process=service)
    dsn = settings.sentry_dsn.get_secret_value()
    if dsn:
        try:
            import sentry_sdk
        except ImportError:
            log.warning("sentry_unavailable", reason="install svd-serve[observability]")
        else:
            sentry_sdk.init(
                dsn=dsn,
                environment=settings.environment,
                traces_sample_rate=settings.sentry_traces_sample_rate,
                send_default_pii=False,  # no request bodies, headers or user data
            )
            sentry_sdk.set_tag("svd.process", service)
            log.info("sentry_enabled", process=service)


@contextmanager
def job_span(name: str, job_id: str, **attributes: str | int | float) -> Iterator[None]:
    """A span named `name` for one job's stage; nothing at all when tracing is off."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes={"svd.job_id": job_id, **attributes}):
        yield


def shutdown_tracing() -> None:
    """Send the spans still buffered and turn tracing off (process exit, tests)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
