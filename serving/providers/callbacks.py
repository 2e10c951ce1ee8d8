"""Managed providers' callbacks, registered for real on the provider-webhook route (issue #14).

fal calls `POST /api/v1/provider/webhook/fal?job=<id>&token=<HMAC>` when a request ends. fal
signs its callbacks with ED25519 keys from a JWKS, not Standard Webhooks, so it is verified the
other way the route offers: the per-job token in the URL, and the request's status re-read from
fal (the body is only a hint). The handler then wakes the job's poller in the Dispatcher
(`Keys.provider_wake`), which reads the status and the result itself: the callback changes
nothing on its own, so a forged or replayed one can at most cause an early poll.

Runway sends no callbacks for API tasks; it is polled only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import fal_client
import redis.asyncio as aioredis
import structlog

from serving.db.jobs import JobRepository
from serving.errors import NotFound
from serving.keys import Keys
from serving.provider_names import FAL
from serving.settings import Settings
from serving.webhooks.inbound import InboundEvent, ProviderRegistry

log = structlog.get_logger(__name__)

WAKE_TTL_S = 3600
Closer = Callable[[], Awaitable[None]]


class PollerWake:
    """The handler of a verified callback: wake the job's poller (one list entry, expiring)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def __call__(self, event: InboundEvent) -> None:
        if event.job_id is None:
            return
        key = self._keys.provider_wake(event.job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, str(event.payload.get("status", "")))
            pipe.expire(key, WAKE_TTL_S)
            await pipe.execute()
        log.info("provider_poller_woken", provider=event.provider, job_id=event.job_id,
                 status=event.payload.get("status"))


class FalRequestReader:
    """Re-reads from fal the request our job row names (never the id in the callback's body)."""

    def __init__(self, settings: Settings, jobs: JobRepository) -> None:
        from serving.providers.fal import queue_client

        self._jobs = jobs
        self._model = settings.fal_model
        self._client = queue_client(settings)

    async def read_task(self, job_id: str, claimed: Mapping[str, Any]) -> dict[str, Any]:
        record = await self._jobs.get(job_id)
        if record is None or record.provider != FAL or not record.provider_job_id:
            raise NotFound(f"Job {job_id} has no fal request.")
        status = await self._client.status(self._model, record.provider_job_id)
        name = {fal_client.Queued: "IN_QUEUE", fal_client.InProgress: "IN_PROGRESS"}.get(type(status), "COMPLETED")
        return {"request_id": record.provider_job_id, "status": name,
                "error": getattr(status, "error", None)}

    async def aclose(self) -> None:
        await (await self._client._client).aclose()


def register_provider_webhooks(
    registry: ProviderRegistry, settings: Settings, jobs: JobRepository, redis: aioredis.Redis, keys: Keys
) -> list[Closer]:
    """Register each configured provider that calls back; what to close at shut-down."""
    closers: list[Closer] = []
    if settings.fal_api_key.get_secret_value():
        reader = FalRequestReader(settings, jobs)
        registry.register(FAL, PollerWake(redis, keys), reader=reader)
        closers.append(reader.aclose)
    return closers
