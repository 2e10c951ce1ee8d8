"""Health, readiness, metrics, models and local object downloads."""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.registry import list_specs
from serving.db.migrate import check_migrated
from serving.errors import NotFound, SvdServeError
from serving.ingress.deps import OwnerDep, Services, ServicesDep
from serving.ingress.problems import problem
from serving.ingress.catalog import model_info, request_limits
from serving.ingress.schemas import ModelListResponse
from serving.observability.exporter import render, shared_families
from serving.observability.spend import spend_families
from serving.storage import LocalStorage

log = structlog.get_logger(__name__)

router = APIRouter()


@router.get("/healthz", operation_id="getHealth", tags=["system"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", operation_id="getReadiness", tags=["system"])
async def readyz(services: ServicesDep) -> Response:
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(services.redis.ping(), timeout=2)
        checks["redis"] = "ok"
    except Exception as exc:  # readiness reports, it does not raise
        checks["redis"] = f"error: {type(exc).__name__}"
    try:
        await asyncio.wait_for(check_migrated(services.engine), timeout=5)
        checks["database"] = "ok"
    except SvdServeError as exc:
        checks["database"] = f"error: {exc.code}"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    # Information only: the ingress keeps accepting jobs while no worker runs (on Kubernetes the
    # GPU cluster may be down or scaling; the queue is the buffer), so this never fails readiness.
    worker = await _worker_info(services)
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks, "worker": worker})
    return problem(503, "not_ready", "A dependency is unavailable.", checks=checks, worker=worker)


async def _worker_info(services: Services) -> dict[str, object]:
    """Whether a dispatcher consumes the queue: {"consumers": n}, or {"consumers": null, "error"}."""
    try:
        return {"consumers": await asyncio.wait_for(services.queue.consumers(), timeout=2)}
    except Exception as exc:  # readiness reports, it does not raise
        return {"consumers": None, "error": type(exc).__name__}


@router.get("/metrics", operation_id="getMetrics", tags=["system"], response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format"}})
async def metrics(services: ServicesDep) -> Response:
    # This process's own metrics; the Redis-held ones (queue gauges, worker metrics) only where
    # this ingress is their one exporter (serving.observability.exporter explains why).
    body = generate_latest() + render(await spend_families(services.budgets))  # budgets: from the job store
    if services.settings.metrics_shared_on_ingress:
        body += render(await shared_families(services.redis, services.queue, services.keys))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/models", operation_id="listModels", response_model=ModelListResponse, response_model_by_alias=True, tags=["models"])
async def models(services: ServicesDep, owner: OwnerDep) -> ModelListResponse:  # any key with `read`
    """Every model with its defaults and accepted ranges, and the choices all requests share."""
    return ModelListResponse(models=[model_info(s) for s in list_specs()], default=services.settings.default_model,
                             limits=request_limits(services.settings))


@router.get("/files/{key:path}", tags=["files"], include_in_schema=False)
async def local_file(
    key: str, services: ServicesDep, expires: int = Query(...), signature: str = Query(...)
) -> FileResponse:
    storage = services.storage
    if not isinstance(storage, LocalStorage) or not storage.verify(key, expires, signature):
        raise NotFound("No such file, or the link has expired.")
    try:
        path = storage.path(key)
    except ValueError:
        raise NotFound("No such file, or the link has expired.") from None
    if not path.is_file():
        raise NotFound("No such file, or the link has expired.")
    return FileResponse(
        path,
        media_type=storage.content_type(key),
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300"},
    )
