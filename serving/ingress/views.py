"""Job rows -> API answers: live progress from Redis, queue position, fresh download URLs."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from serving.cost import job_estimate
from serving.backpressure import estimated_start
from serving.db.jobs import JobRecord
from serving.ingress.deps import Services
from serving.ingress.schemas import ErrorInfo, JobStatusResponse, JobWarning
from serving.provider_names import LOCAL
from serving.types import JobStatus
from serving.uris import key_from_uri


async def _signed_url(services: Services, uri: str | None) -> str | None:
    """A download URL: the CDN's (base + key) when one is configured, else freshly presigned."""
    if not uri:
        return None
    key = key_from_uri(uri)
    cdn = services.settings.cdn_base_url
    if cdn:
        return f"{cdn.rstrip('/')}/{quote(key, safe='/')}"
    return await asyncio.to_thread(services.storage.url, key, services.settings.presign_ttl_s)


async def _output_urls(services: Services, record: JobRecord) -> dict[str, str]:
    """A URL for every stored output, by kind; rows from before the outputs map have two."""
    uris = {kind: str(stored["uri"]) for kind, stored in record.outputs.items()}
    if not uris:
        uris = {kind: uri for kind, uri in (("mp4", record.result_url), ("thumbnail", record.thumbnail_url)) if uri}
    urls = await asyncio.gather(*(_signed_url(services, uri) for uri in uris.values()))
    return {kind: url for kind, url in zip(uris, urls, strict=True) if url}


def _warnings(record: JobRecord) -> list[JobWarning]:
    """What the job will not honour. Stable Video Diffusion is conditioned on the image alone, so a
    prompt is unused on the local provider (known once the job is routed there or asked for it)."""
    provider = record.provider if record.routing_reason else record.requested_provider
    if record.prompt and provider == LOCAL:
        return [JobWarning(code="prompt_unused", message=(
            "The prompt was not used: local Stable Video Diffusion animates the image alone. "
            "Providers that take a text prompt are listed in docs/providers.md."))]
    return []


async def job_view(services: Services, record: JobRecord, *, live: bool = True) -> JobStatusResponse:
    progress, stage = record.progress, record.stage
    position = None
    if live and record.status is JobStatus.PROCESSING:
        overlay = await services.redis.hgetall(services.keys.progress(record.id))
        if overlay:
            progress = max(progress, float(overlay.get(b"progress", progress)))
            raw_stage = overlay.get(b"stage", b"")
            stage = (raw_stage.decode() if isinstance(raw_stage, bytes) else raw_stage) or stage
    estimated_start_at = None
    if live and record.status is JobStatus.QUEUED:
        position = await services.queue.position(record.id)
        if position is not None:
            stats = await services.queue.stats(services.settings.drain_rate_window_s)
            estimated_start_at = estimated_start(position, stats)
    outputs = await _output_urls(services, record)
    # The video and the thumbnail are outputs too: reuse their URLs rather than signing twice.
    result_url = outputs.get("mp4") or await _signed_url(services, record.result_url)
    thumbnail_url = outputs.get("thumbnail") or await _signed_url(services, record.thumbnail_url)
    checksums = {kind: str(stored["sha256"]) for kind, stored in record.outputs.items() if stored.get("sha256")}
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
        checksums=checksums,
        cached=record.cached,
        cached_from=record.cached_from,
        retry_of=record.retry_of,
        estimated_start_at=estimated_start_at,
        error=error,
        timings=record.timings,
        gpu_seconds=record.gpu_seconds,
        cost_usd=record.cost_usd,
        routing_reason=record.routing_reason,
        provider_credits=record.provider_credits,
        # Once routed, on the provider the job went to; before, on the one it is expected to use.
        estimated_cost_usd=job_estimate(
            services.settings, record.job_params, record.provider if record.routing_reason else record.requested_provider
        ).usd,
        created_at=record.created_at,
        updated_at=record.updated_at,
        started_at=record.started_at,
        completed_at=record.completed_at,
        metadata=record.metadata,
        warnings=_warnings(record),
    )
