"""Prometheus metrics of the ingress (names follow Prometheus conventions)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SUBMISSIONS = Counter(
    "svd_submissions_total", "Job submissions by HTTP status code and model", ["status_code", "model"]
)
CANCELS = Counter("svd_cancellations_total", "Cancel requests accepted", ["from_status"])
REQUEST_LATENCY = Histogram(
    "svd_http_request_duration_seconds", "Ingress request latency", ["method", "route"]
)
