"""`svd_http_request_duration_seconds` for every ingress request, labelled by route template
(`/api/v1/animate-image/status/{job_id}`, never the raw path: job ids would explode the series)."""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.metrics import REQUEST_LATENCY


class RequestLatencyMiddleware:
    """Pure ASGI, so streaming answers (SSE) are timed to their end without buffering."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            REQUEST_LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)


def install_http_metrics(app: FastAPI) -> None:
    app.add_middleware(RequestLatencyMiddleware)
