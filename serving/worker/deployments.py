"""The Ray Serve application: Dispatcher -> Generator (GPU) -> PostProcessor (CPU)."""

from __future__ import annotations

import asyncio

import numpy as np
import redis.asyncio as aioredis
import structlog
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import check_migrated
from serving.keys import Keys
from serving.logs import configure_service_logging
from serving.queue import QueueConsumer
from serving.settings import Settings
from serving.storage import make_storage
from serving.types import GenerationRequest, GenerationResult, PostProcessRequest, PostProcessResult
from serving.webhooks.services import build_worker_delivery
from serving.worker.generation import GenerationService
from serving.worker.local_backend import LocalRayBackend
from serving.worker.postprocessing import PostProcessingService
from serving.worker.runner import JobRunner

log = structlog.get_logger(__name__)


@serve.deployment(max_ongoing_requests=1)
class Generator:
    """Runs the SVD pipeline; weights load in the constructor so the replica is ready only after."""

    def __init__(self, settings: Settings) -> None:
        configure_service_logging(settings)
        self._service = GenerationService(settings)
        self._service.warm_up(settings.default_model)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        # Torch work runs in a thread so the replica can still answer health checks.
        return await asyncio.to_thread(self._service.generate, request)


@serve.deployment(max_ongoing_requests=4)
class PostProcessor:
    """Encodes H.264 MP4 + JPEG thumbnail with ffmpeg and uploads them."""

    def __init__(self, settings: Settings) -> None:
        configure_service_logging(settings)
        self._service = PostProcessingService(settings)

    async def process(self, request: PostProcessRequest, frames: np.ndarray) -> PostProcessResult:
        return await asyncio.to_thread(self._service.process, request, frames)

    async def discard(self, request: PostProcessRequest) -> int:
        return await asyncio.to_thread(self._service.discard, request)


@serve.deployment(max_ongoing_requests=8)
class Dispatcher:
    """Consumes the Redis queue and drives each job through the Generator and the PostProcessor."""

    async def __init__(self, settings: Settings, generator: DeploymentHandle, postprocessor: DeploymentHandle) -> None:
        configure_service_logging(settings)
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the dispatcher needs the queue's Redis.")
        self._engine = make_engine(settings.resolved_database_url)
        await check_migrated(self._engine)
        self._redis = aioredis.Redis.from_url(settings.redis_url)
        # Events and webhooks: the runner tells the sink; the delivery loop sends webhooks from
        # here because this replica already holds the DB and Redis and runs for as long as jobs
        # do (several replicas share the due deliveries through leases).
        self._delivery = build_worker_delivery(settings, make_session_factory(self._engine), make_storage(settings))
        runner = JobRunner(
            JobRepository(make_session_factory(self._engine)),
            LocalRayBackend(generator, postprocessor),
            self._redis,
            Keys(settings.key_prefix),
            self._delivery.sink,
        )
        self._consumer = QueueConsumer(
            settings.redis_url,
            settings.queue_name,
            runner.handle,
            concurrency=settings.dispatcher_concurrency,
            lock_duration_ms=settings.lock_duration_ms,
            stalled_interval_ms=settings.lock_duration_ms,
        )
        await self._consumer.start()
        await self._delivery.start()
        log.info("dispatcher_started", queue=settings.queue_name)

    async def ping(self) -> str:
        return "ok"

    async def check_health(self) -> None:
        await self._redis.ping()

    async def __del__(self) -> None:
        await self._consumer.close(wait_for_active=False)
        await self._delivery.aclose()
        await self._redis.aclose()
        await self._engine.dispose()


def build_app(settings: Settings) -> serve.Application:
    cpu_only = {"num_cpus": 0}
    generator = Generator.options(
        ray_actor_options={"num_cpus": 0, "num_gpus": settings.generator_num_gpus}
    ).bind(settings)
    postprocessor = PostProcessor.options(ray_actor_options=cpu_only).bind(settings)
    return Dispatcher.options(ray_actor_options=cpu_only).bind(settings, generator, postprocessor)
