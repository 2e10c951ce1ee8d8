"""The metrics that live in Redis, exported once: `svd-serve exporter`.

Worker metrics (aggregated in Redis by the Ray replicas, `serving.metrics`) and the queue gauges
(read from the queue on each scrape, `serving.observability.queue_gauges`) are one cluster-wide
set of numbers. If every ingress pod exported them, Prometheus would scrape N copies and every
`sum()` in the alerts and dashboards would be N times too large (3-20 pods under the HPA). So
on Kubernetes one small Deployment (one replica, `Recreate`) serves them, with its own
ServiceMonitor, and the ingress pods export only their own process metrics. On one machine
(`svd-serve up`) the ingress is the only process and serves both (`metrics_shared_on_ingress`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import structlog
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from serving.keys import Keys
from serving.metrics import StaticCollector, read_worker_metrics
from serving.observability.queue_gauges import queue_families
from serving.queue import JobQueue
from serving.settings import Settings

log = structlog.get_logger(__name__)


async def shared_families(redis: aioredis.Redis, queue: JobQueue, keys: Keys) -> list[Metric]:
    """Queue gauges and worker metrics, read from Redis now. Without Redis the answer is just
    `svd_metrics_redis_up 0` (a scrape reports, it does not fail)."""
    families: list[Metric] = []
    try:
        families = [*await queue_families(queue), *await read_worker_metrics(redis, keys)]
        up = 1.0
    except Exception as exc:
        log.warning("metrics_redis_read_failed", error=repr(exc))
        up = 0.0
    families.append(GaugeMetricFamily("svd_metrics_redis_up", "1 when Redis-held metrics could be read", value=up))
    return families


def render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StaticCollector(families))
    return generate_latest(registry)


def create_exporter_app(settings: Settings) -> FastAPI:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: the exporter reads the queue and the worker metrics there.")
    redis_url = settings.redis_url
    keys = Keys(settings.key_prefix)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
        app.state.queue = JobQueue(redis_url, settings.queue_name)
        try:
            yield
        finally:
            await app.state.queue.close()
            await app.state.redis.aclose()

    app = FastAPI(title="svd-serve metrics exporter", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.get("/metrics")
    async def metrics() -> Response:
        families = await shared_families(app.state.redis, app.state.queue, keys)
        return Response(render(families), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
