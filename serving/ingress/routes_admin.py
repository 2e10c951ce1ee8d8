"""/api/v1/admin: operator views across owners (API keys with the `admin` scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from serving.db.jobs import JobRecord
from serving.ingress.deps import AdminDep, PageLimit, QueryText, ServicesDep
from serving.ingress.overview import summarise
from serving.ingress.schemas import AdminOverview, DeadLetterEntry, DeadLetterResponse, ErrorInfo
from serving.observability.exporter import shared_families

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])


def _entry(record: JobRecord) -> DeadLetterEntry:
    error = ErrorInfo(code=record.error_code, message=record.error_message or "") if record.error_code else None
    return DeadLetterEntry(
        job_id=record.id,
        owner_id=record.owner_id,
        error=error,
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        model=record.model,
        retry_of=record.retry_of,
        created_at=record.created_at,
        completed_at=record.completed_at,
    )


@router.get("/dead-letter", operation_id="listDeadLetters", response_model=DeadLetterResponse, response_model_by_alias=True,
            responses={401: {"description": "Missing or invalid API key"},
                       403: {"description": "The API key lacks the admin scope"}})
async def dead_letter(
    services: ServicesDep,
    _admin: AdminDep,
    limit: PageLimit = 50,
    cursor: str | None = None,
    owner: Annotated[QueryText | None, Query(max_length=128)] = None,
) -> DeadLetterResponse:
    """Jobs that ended in `error` (attempts exhausted, a job that kept killing its worker, a
    permanent failure), newest first; `POST /api/v1/animate-image/{jobId}/retry` re-runs one."""
    records, next_cursor = await services.jobs.list_dead_letters(limit=limit, cursor=cursor, owner_id=owner)
    return DeadLetterResponse(jobs=[_entry(r) for r in records], next_cursor=next_cursor)


@router.get("/overview", response_model=AdminOverview, response_model_by_alias=True, operation_id="getAdminOverview",
            responses={401: {"description": "Missing or invalid API key"},
                       403: {"description": "The API key lacks the admin scope"}})
async def overview(services: ServicesDep, _admin: AdminDep) -> AdminOverview:
    """Queue depth and oldest wait per priority, Generators wanted/running, provider breakers,
    error rate: the aggregates `/metrics` exports from Redis, as JSON; and this month's spend."""
    families = await shared_families(services.redis, services.queue, services.keys)
    return summarise(families, await services.budgets.ledger.month_total(None))
