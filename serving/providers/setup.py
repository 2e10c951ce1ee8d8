"""Building the router the Dispatcher uses: local pool, Runway when configured, their signals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from serving.backend import ProviderBackend, VideoBackend
from serving.db.jobs import JobRepository
from serving.keys import Keys
from serving.providers.health import LocalHealth, PoolState
from serving.providers.router import LOCAL, RUNWAY, ProviderRouter
from serving.queue import JobQueue
from serving.settings import Settings


class LocalPool(ProviderBackend, Protocol):
    """The local backend: a pool of Generators that may be scaled to zero or on its way up."""

    async def pool_state(self) -> PoolState: ...


@dataclass
class Providers:
    """The router and what must be closed with it."""

    router: ProviderRouter
    queue: JobQueue
    runway: VideoBackend | None

    async def aclose(self) -> None:
        await self.queue.close()
        close = getattr(self.runway, "aclose", None)
        if close is not None:
            await close()


def build_providers(
    settings: Settings, local: LocalPool, jobs: JobRepository, redis: aioredis.Redis, keys: Keys
) -> Providers:
    """The local backend always; Runway only with an API key (it is then usable when asked for
    by name, and as the `auto` fallback when `fallback_enabled`)."""
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: the router reads the queue's depth.")
    backends: dict[str, VideoBackend] = {LOCAL: local}
    runway = None
    if settings.runway_api_key.get_secret_value():
        from serving.providers.runway import RunwayBackend  # the SDK only where it is used

        runway = RunwayBackend(settings, jobs, redis, keys)
        backends[RUNWAY] = runway
    queue = JobQueue(settings.redis_url, settings.queue_name)

    async def estimate_wait_s() -> float:
        # Jobs ahead of a new one, at the expected local time per job, over the jobs run at once.
        counts = await queue.counts()
        return counts["waiting"] * settings.local_job_seconds_estimate / max(1, settings.dispatcher_concurrency)

    health = LocalHealth(local.pool_state, cold_start_allowance_s=settings.local_cold_start_allowance_s)
    router = ProviderRouter.from_settings(settings, backends, health=health, estimate_wait_s=estimate_wait_s)
    return Providers(router, queue, runway)
