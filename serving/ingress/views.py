"""Job rows -> API answers: live progress from Redis, queue position, fresh download URLs."""

from __future__ import annotations

import asyncio

from serving.db.jobs import JobRecord
from serving.ingress.deps import Services
from serving.ingress.schemas import ErrorInfo, JobStatusResponse
from serving.types import JobStatus
from serving.uris import key_from_uri


async def _signed_url(services: Services, uri: str | None) -> str | None:
    if not uri:
        return None
    key = key_from_uri(uri)
    return await asyncio.to_thread(services.storage.url, key, services.settings.presign_ttl_s)


async def job_view(services: Services, record: JobRecord, *, live: bool = True) -> JobStatusResponse:
    progress, stage = record.progress, record.stage
    position = None
    if live and record.status is JobStatus.PROCESSING:
        overlay = await services.redis.hgetall(services.keys.progress(record.id))
        if overlay:
            progress = max(progress, float(overlay.get(b"progress", progress)))
            stage = overlay.get(b"stage", b"").decode() or stage
    if live and record.status is JobStatus.QUEUED:
        position = await services.queue.position(record.id)
    result_url = await _signed_url(services, record.result_url)
    thumbnail_url = await _signed_url(services, record.thumbnail_url)
    outputs = {name: url for name, url in (("mp4", result_url), ("thumbnail", thumbnail_url)) if url}
    error = ErrorInfo(code=record.error_code, message=record.error_message or "") if record.error_code else None
    return JobStatusResponse(
        job_id=record.id,
        status=record.status,
        progress=progress,
        stage=stage,
        queue_position=position,
        attempts=record.attempts,
        provider=record.provider,
        provider_job_id=record.provider_job_id,
        model=record.model,
        prompt=record.prompt,
        params=record.params,
        result_url=result_url,
        thumbnail_url=thumbnail_url,
        outputs=outputs,
        error=error,
        timings=record.timings,
        gpu_seconds=record.gpu_seconds,
        cost_usd=record.cost_usd,
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        completed_at=record.completed_at,
        metadata=record.metadata,
    )
