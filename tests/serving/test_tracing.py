"""Tracing is off by default; with an OTLP endpoint, job spans reach a collector over real
OTLP/HTTP (a loopback server decoding the protobuf export request, as a collector does)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from serving.observability import tracing
from serving.settings import Settings
from tests.serving.test_api_keys import app_settings, png_bytes, running_app


class Collector:
    """Receives OTLP/HTTP protobuf exports at /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, dict[str, str]]] = []
        self.got = threading.Event()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    sink = Collector()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            request = ExportTraceServiceRequest.FromString(body)
            assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attrs = {a.key: a.value.string_value or str(a.value.int_value) for a in span.attributes}
                        sink.spans.append((span.name, attrs))
            sink.got.set()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_tracing_is_off_by_default(tmp_path: Path) -> None:
    tracing.setup_observability(Settings(data_dir=tmp_path), "api")
    assert tracing._tracer is None
    with tracing.job_span("dispatch", "job-1"):
        pass  # a no-op


def test_job_spans_reach_the_collector(collector: tuple[Collector, str], tmp_path: Path) -> None:
    sink, endpoint = collector
    tracing.setup_observability(Settings(data_dir=tmp_path, otel_exporter_otlp_endpoint=endpoint), "dispatcher")
    try:
        with tracing.job_span("dispatch", "job-42", attempt=2):
            with tracing.job_span("generate", "job-42"):
                pass
    finally:
        tracing.shutdown_tracing()  # flushes the batch processor
    assert sink.got.wait(timeout=10)
    assert sorted(name for name, _ in sink.spans) == ["dispatch", "generate"]
    assert all(attrs["svd.job_id"] == "job-42" for _, attrs in sink.spans)
    assert dict(sink.spans)["dispatch"]["attempt"] == "2"


async def test_a_submission_opens_the_jobs_trace_at_the_ingress(
    collector: tuple[Collector, str], database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    sink, endpoint = collector
    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path, otel_exporter_otlp_endpoint=endpoint)
    try:
        async with running_app(settings) as app, app.client(await app.new_key("tracy")) as client:
            answer = await client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")})
            assert answer.status_code == 202, answer.text
    finally:
        tracing.shutdown_tracing()
    assert sink.got.wait(timeout=10)
    accept = [attrs for name, attrs in sink.spans if name == "accept"]
    assert accept == [{"svd.job_id": answer.json()["jobId"], "owner_id": "tracy", "model": "tiny-random"}]
