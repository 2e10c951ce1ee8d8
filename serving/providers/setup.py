"""Building what the Dispatcher runs jobs on: the local pool, each managed provider with a key,
the router over them and the one `RoutedBackend` the runner sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import redis.asyncio as aioredis

from serving.backend import PostProcess, ProviderBackend
from serving.cost import Prices
from serving.db.jobs import JobRepository
from serving.keys import Keys
from serving.providers.health import LocalHealth, PoolState
from serving.provider_names import FAL, LOCAL, RUNWAY
from serving.providers.routed import RoutedBackend
from serving.providers.router import ProviderRouter
from serving.queue import JobQueue
from serving.settings import Settings

if TYPE_CHECKING:
    from serving.observability.job_metrics import JobMetrics


class LocalPool(ProviderBackend, Protocol):
    """The local backend: a pool of Generators that may be scaled to zero or on its way up."""

    async def pool_state(self) -> PoolState: ...


@dataclass
class Providers:
    """The routed backend, its router, and what must be closed with them."""

    backend: RoutedBackend
    router: ProviderRouter
    queue: JobQueue
    managed: dict[str, ProviderBackend] = field(default_factory=dict)

    @property
    def runway(self) -> ProviderBackend | None:
        return self.managed.get(RUNWAY)

    async def aclose(self) -> None:
        await self.queue.close()
        for backend in self.managed.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()


def managed_backends(
    settings: Settings, jobs: JobRepository, redis: aioredis.Redis, keys: Keys
) -> dict[str, ProviderBackend]:
    """Each managed provider this server holds a key for (its SDK imported only then)."""
    backends: dict[str, ProviderBackend] = {}
    if settings.runway_api_key.get_secret_value():
        from serving.providers.runway import RunwayBackend

        backends[RUNWAY] = RunwayBackend(settings, jobs, redis, keys)
    if settings.fal_api_key.get_secret_value():
        from serving.providers.fal import FalBackend

        backends[FAL] = FalBackend(settings, jobs, redis, keys)
    return backends


def build_providers(
    settings: Settings,
    local: LocalPool,
    postprocess: PostProcess,
    jobs: JobRepository,
    redis: aioredis.Redis,
    keys: Keys,
    *,
    metrics: JobMetrics | None = None,
) -> Providers:
    """The local backend always; a managed provider only with its API key (it is then usable
    when asked for by name, and as the `auto` fallback when it is the `fallback_provider`)."""
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: the router reads the queue's depth.")
    managed = managed_backends(settings, jobs, redis, keys)
    backends: dict[str, ProviderBackend] = {LOCAL: local, **managed}
    queue = JobQueue(settings.redis_url, settings.queue_name)

    async def estimate_wait_s() -> float:
        # Jobs ahead of a new one, at the expected local time per job, over the jobs run at once.
        counts = await queue.counts()
        return counts["waiting"] * settings.local_job_seconds_estimate / max(1, settings.dispatcher_concurrency)

    health = LocalHealth(local.pool_state, cold_start_allowance_s=settings.local_cold_start_allowance_s)
    router = ProviderRouter.from_settings(settings, backends, health=health, estimate_wait_s=estimate_wait_s)
    backend = RoutedBackend(router, postprocess, jobs, prices=Prices.from_settings(settings), metrics=metrics)
    return Providers(backend, router, queue, managed)
