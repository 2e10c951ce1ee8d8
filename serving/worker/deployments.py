"""The Ray Serve application: Dispatcher -> Generator (GPU) -> PostProcessor (CPU)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import structlog
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.autoscaling import QueueProbe, generator_scaling_options
from serving.cost import Prices
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import check_migrated
from serving.errors import RunHandedBack
from serving.keys import Keys
from serving.logs import configure_service_logging
from serving.observability.job_metrics import JobMetrics
from serving.observability.replicas import ReplicaReporter
from serving.observability.tracing import setup_observability
from serving.progress import StreamLimits
from serving.providers.setup import build_providers
from serving.settings import Settings
from serving.storage import make_storage
from serving.types import Clip, GenerationRequest, GenerationResult, PostProcessRequest, PostProcessResult
from serving.webhooks.services import build_worker_delivery
from serving.worker.drain import DrainReport, dispatcher_drainer
from serving.worker.generation import GenerationService
from serving.worker.local_backend import LocalRayBackend, RayPostProcess
from serving.worker.node_drain import DrainState, NodeDrainWatch
from serving.worker.postprocessing import PostProcessingService
from serving.worker.runner import JobRunner, queue_consumer
from serving.worker.watchdog import generator_watchdog

log = structlog.get_logger(__name__)


@serve.deployment(max_ongoing_requests=16)
class Generator:
    """Runs the SVD pipeline; weights load in the constructor so the replica is ready only after.

    Requests arriving together are collected by `@serve.batch` and run in as few denoising loops
    as their shapes and the frames x pixels budget allow (`GenerationService.generate_many`).
    It reports the queue to Serve's autoscaler (`record_autoscaling_stats`, serving.autoscaling)
    and watches its own Ray node: once the node drains it takes no new run and hands back the
    runs that would miss the deadline (serving.worker.node_drain)."""

    async def __init__(self, settings: Settings) -> None:
        configure_service_logging(settings)
        setup_observability(settings, "generator")
        # Loading and compiling take minutes on a GPU: off the replica's event loop.
        self._service = await asyncio.to_thread(GenerationService, settings)
        await asyncio.to_thread(self._service.warm_up, settings.default_model)
        self._generate_batch.set_max_batch_size(settings.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        # Issue #5: a stuck step, a job past its deadline or a broken CUDA context fails the
        # health check, and Ray Serve restarts the replica.
        self._watchdog = generator_watchdog(settings)
        self._queue = QueueProbe(settings.redis_url or "", settings.queue_name, float(settings.drain_rate_window_s))
        self._node = NodeDrainWatch.for_this_replica(self._on_node_draining)
        self._service.node_id = self._node.node_id
        self._node.start()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Called by Ray Serve every `metrics_interval_s`: the queue for the autoscaling policy."""
        return await self._queue.autoscaling_stats()

    async def check_health(self) -> None:
        await self._watchdog.check()
        await asyncio.to_thread(self._service.refresh_gauges)

    async def _on_node_draining(self, state: DrainState) -> None:
        self._service.node_draining(state)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
        # Torch work runs in a thread so the replica can still answer health checks.
        return await asyncio.to_thread(self._service.generate_many, requests)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if not self._service.accepting:
            # Serve still routes to a replica whose node drains until its replacement runs.
            raise RunHandedBack(f"Node {self._node.node_id} is draining; job {request.job_id} goes elsewhere.")
        with self._watchdog.watch(request.job_id):
            try:
                outcome = await self._generate_batch(request)
            except asyncio.CancelledError:
                # The dispatcher cancelled the call (it handed the job back on a drain): the
                # shared loop drops this run at its next step instead of finishing it for nobody.
                self._service.abandon(request.run_id)
                log.info("generation_abandoned", job_id=request.job_id, run_id=request.run_id)
                raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def __del__(self) -> None:
        await self._node.aclose()
        await self._queue.aclose()


@serve.deployment(max_ongoing_requests=4)
class PostProcessor:
    """Makes every job's outputs, whichever backend made the clip: encodes frames (or remuxes a
    provider's MP4) with ffmpeg and uploads them."""

    def __init__(self, settings: Settings) -> None:
        configure_service_logging(settings)
        setup_observability(settings, "postprocessor")
        self._service = PostProcessingService(settings)

    async def process(self, request: PostProcessRequest, clip: Clip) -> PostProcessResult:
        return await asyncio.to_thread(self._service.process, request, clip)

    async def discard(self, request: PostProcessRequest) -> int:
        return await asyncio.to_thread(self._service.discard, request)


@serve.deployment(max_ongoing_requests=8)
class Dispatcher:
    """Consumes the Redis queue and drives each job through the Generator and the PostProcessor."""

    async def __init__(self, settings: Settings, generator: DeploymentHandle[Any], postprocessor: DeploymentHandle[Any]) -> None:
        configure_service_logging(settings)
        setup_observability(settings, "dispatcher")
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the dispatcher needs the queue's Redis.")
        self._engine = make_engine(settings.resolved_database_url)
        await check_migrated(self._engine)
        self._redis = aioredis.Redis.from_url(settings.redis_url)
        # Events and webhooks: the runner tells the sink; the delivery loop sends webhooks from
        # here because this replica already holds the DB and Redis and runs for as long as jobs
        # do (several replicas share the due deliveries through leases).
        sessions = make_session_factory(self._engine)
        jobs = JobRepository(sessions)
        keys = Keys(settings.key_prefix)
        prices = Prices.from_settings(settings)
        self._delivery = build_worker_delivery(settings, sessions, make_storage(settings))
        # Issue #6, #14: each job is routed (local pool, Runway, fal), its clip post-processed by
        # the PostProcessor whoever made it, and its cost recorded.
        local = LocalRayBackend(
            generator, app_name=settings.serve_app_name, prices=prices,
            job_seconds_estimate=settings.local_job_seconds_estimate, deadline_s=settings.job_deadline_s,
        )
        metrics = JobMetrics(self._redis, keys, settings.gpu_hour_price_usd)
        self._providers = build_providers(
            settings, local, RayPostProcess(postprocessor), jobs, self._redis, keys, metrics=metrics
        )
        runner = JobRunner(
            jobs, self._providers.backend, self._redis, keys, self._delivery.sink, metrics, prices=prices,
            stream_limits=StreamLimits.from_settings(settings),
        )
        self._consumer = queue_consumer(settings, runner)
        # SIGTERM (via __del__ or drain()) and a drain of this replica's own Ray node (a GPU pod
        # going away, see serving.worker.node_drain) hand unfinished jobs back to the queue.
        self._drainer = dispatcher_drainer(self._consumer, jobs, self._redis, keys, settings.drain_grace_s)
        self._node = NodeDrainWatch.for_this_replica(self._on_node_draining)
        self._node.start()
        await self._consumer.start()
        await self._delivery.start()
        # Replicas wanted vs running, for the ingress's /metrics (which cannot reach Ray).
        self._replicas = ReplicaReporter(self._redis, keys, settings.serve_app_name,
                                         settings.metrics_replicas_interval_s, self._providers.router.breakers_open)
        self._replicas.start()
        log.info("dispatcher_started", queue=settings.queue_name)

    async def ping(self) -> str:
        return "ok"

    async def check_health(self) -> None:
        await self._redis.ping()
        # A consumer whose loop ended takes no more jobs: fail, and Ray Serve replaces the replica
        # (its jobs go back to the queue once their leases lapse). A drain stops taking jobs on
        # purpose but keeps the loop.
        if not self._consumer.consuming:
            raise RuntimeError(f"the queue consumer of {self._consumer.queue_name} stopped")

    async def drain(self, reason: str = "sigterm") -> DrainReport:
        """Stop taking jobs, finish those ending within the grace period, hand back the rest."""
        return await self._drainer.drain(reason)

    async def _on_node_draining(self, state: DrainState) -> None:
        if not self._drainer.draining:
            # In the background: the watch keeps polling while the drain runs.
            self._node_drain = asyncio.create_task(
                self._drainer.drain("node draining", grace_s=state.seconds_left()), name="node-drain"
            )

    async def __del__(self) -> None:
        await self._node.aclose()
        await self._drainer.drain("shutdown")  # a no-op after an earlier drain()
        await self._consumer.close(wait_for_active=False)
        await self._replicas.close()
        await self._delivery.aclose()
        await self._providers.aclose()
        await self._redis.aclose()
        await self._engine.dispose()


def build_app(settings: Settings) -> serve.Application:
    cpu_only = {"num_cpus": 0}
    generator = Generator.options(
        ray_actor_options={"num_cpus": 0, "num_gpus": settings.generator_num_gpus},
        # A replica holds one batch; the rest wait at the handle, where a new replica (scale-out)
        # or another node (drain) can take them, and where Serve's cold-start path sees them.
        max_ongoing_requests=settings.max_batch_size,
        **generator_scaling_options(settings),
    ).bind(settings)
    postprocessor = PostProcessor.options(ray_actor_options=cpu_only).bind(settings)
    # Serve waits this long for __del__ (the drain) before it kills the replica. Pinned by a
    # custom resource where the cluster offers one (the on-demand head on Kubernetes): a
    # Dispatcher on a spot node would hand back every job of the cluster when that node goes.
    dispatcher_actor = {**cpu_only, **({"resources": settings.dispatcher_resources} if settings.dispatcher_resources else {})}
    return Dispatcher.options(
        ray_actor_options=dispatcher_actor, graceful_shutdown_timeout_s=settings.drain_grace_s + 10
    ).bind(settings, generator, postprocessor)
