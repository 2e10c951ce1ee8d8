"""The dispatcher's per-job logic, independent of Ray so it can be tested on its own.

A job is leased from the queue, moved queued -> processing, rendered by a `VideoBackend`, then
moved to exactly one terminal state. Every state change goes through `JobRepository.transition`,
which refuses a second terminal state: a cancel that wins the race keeps the job canceled and the
late outputs are discarded.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypedDict

import redis.asyncio as aioredis
import structlog

from pipelines.errors import NonFiniteOutput
from serving.backend import ProviderOutcome, StageCallback, VideoBackend
from serving.cost import Prices
from serving.db.jobs import JobChanges, JobRecord, JobRepository
from serving.errors import InvalidTransition, JobCanceled, NotFound, PermanentError, ProviderTaskFailed, RetryableError
from serving.events import JobEventSink
from serving.keys import Keys
from serving.lifecycle import RETRYING_STAGE, JobLifecycle
from serving.observability.job_metrics import JobMetrics
from serving.observability.tracing import job_span
from serving.progress import ProgressWriter, StreamLimits
from serving.providers.router import LOCAL, RUNWAY, ProviderRouter, RoutingDecision, RoutingReason
from serving.queue import ConsumedJobInfo, QueueConsumer
from serving.settings import Settings
from serving.uris import key_from_uri
from serving.types import JobParams, JobStatus, QueuedJob, RenderJob, RenderOutcome, Stage

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = structlog.get_logger(__name__)

STAGE_PROGRESS = {Stage.LOADING: 0.0, Stage.ENCODING: 0.92, Stage.UPLOADING: 0.97, Stage.DONE: 1.0}


class _RoutingFields(TypedDict, total=False):
    """The routing columns `_start` sets with the processing transition (issue #6)."""

    provider: str
    routing_reason: str | None


class _CostFields(TypedDict, total=False):
    """The cost columns `_complete` sets with the completed transition (issue #6)."""

    cost_usd: float | None
    provider_credits: float | None


class JobRunner:
    """Runs one leased job to a terminal state (or back to the queue for another attempt)."""

    def __init__(
        self,
        jobs: JobRepository,
        backend: VideoBackend,
        redis: aioredis.Redis,
        keys: Keys,
        events: JobEventSink | None = None,
        metrics: JobMetrics | None = None,
        *,
        router: ProviderRouter | None = None,
        prices: Prices | None = None,
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self._jobs = jobs
        self._backend = backend
        self._redis = redis
        self._keys = keys
        self._metrics = metrics  # worker metrics in Redis (serving.metrics); None in unit tests
        # Every status change and progress report: the row, live events, outcome webhooks, metrics.
        limits = stream_limits or StreamLimits.default()
        self._lifecycle = JobLifecycle(jobs, events, metrics, ProgressWriter(redis, keys, limits))
        # Issue #6: which provider runs each job (None: always `backend`), and what a job costs.
        self._router = router
        self._prices = prices

    async def handle(self, queued: QueuedJob, info: ConsumedJobInfo) -> None:
        # Every log line of this job, here and in what it calls, carries its ids.
        with structlog.contextvars.bound_contextvars(job_id=queued.job_id, owner_id=queued.owner_id):
            with job_span("dispatch", queued.job_id, attempt=info.attempt):
                await self._handle(queued, info)

    async def _handle(self, queued: QueuedJob, info: ConsumedJobInfo) -> None:
        record = await self._jobs.get(queued.job_id)
        if record is None:
            log.warning("job_row_missing", job_id=queued.job_id)
            return
        if record.status.terminal:
            log.info("job_already_final", job_id=record.id, status=record.status.value)
            # A holder that died between its final transition and telling the sink leaves the
            # job here again: announce once more (the event stream and the webhook outbox
            # both keep one outcome per job, so a repeat adds nothing).
            await self._lifecycle.announce(record)
            return
        if await self._redis.exists(self._keys.cancel(record.id)):
            await self._finish_canceled(record.id)
            return
        decision, refusal = await self._route(record)
        record = await self._start(record, decision)
        job = RenderJob(
            job_id=record.id,
            owner_id=record.owner_id,
            image_key=key_from_uri(record.image_url),
            params=JobParams.from_json(record.params),
        )
        log.info("job_started", job_id=record.id, owner_id=record.owner_id, attempt=info.attempt)
        if self._metrics is not None:
            await self._metrics.routed(record.provider or "local", record.routing_reason or "default")
        started = time.perf_counter()
        try:
            if refusal is not None:
                raise refusal  # no provider may take the job: handled like a failed attempt
            outcome = await self._render(record, job, decision, info)
        except JobCanceled:
            await self._finish_canceled(record.id)
            return
        except (PermanentError, NonFiniteOutput) as exc:
            await self._fail(record.id, getattr(exc, "code", "generation_failed"), str(exc), self._failure_cost(exc))
            raise PermanentError(str(exc)) from exc
        except Exception as exc:
            if info.is_last_attempt:
                await self._fail(record.id, "generation_failed", f"Failed after {info.attempt} attempts: {exc}")
                raise PermanentError(str(exc)) from exc
            log.warning("job_attempt_failed", job_id=record.id, attempt=info.attempt, error=repr(exc))
            await self._requeue(record.id, exc)
            raise RetryableError(str(exc)) from exc
        await self._complete(record, job, outcome, time.perf_counter() - started)

    async def _route(self, record: JobRecord) -> tuple[RoutingDecision | None, Exception | None]:
        """Where this attempt runs; an error instead when no provider may take the job."""
        if self._router is None:
            return None, None
        if record.provider == RUNWAY and record.provider_job_id:
            # A Runway task exists for this job already: resume polling it, never create another.
            return RoutingDecision(RUNWAY, RoutingReason.RESUMED), None
        try:
            return await self._router.route(record.requested_provider), None
        except (PermanentError, RetryableError) as exc:
            return None, exc

    async def _render(
        self, record: JobRecord, job: RenderJob, decision: RoutingDecision | None, info: ConsumedJobInfo
    ) -> RenderOutcome:
        """Render on the chosen provider; a local failure on the last attempt may fall back."""
        provider = decision.provider if decision is not None else LOCAL
        try:
            return await self._render_on(provider, job)
        except (JobCanceled, PermanentError, NonFiniteOutput):
            raise
        except Exception as exc:
            if not (info.is_last_attempt and self._router is not None and provider == LOCAL):
                raise
            fallback = await self._router.route(record.requested_provider, local_failed=True)
            if fallback.provider == LOCAL:
                raise
            log.warning("job_falling_back", job_id=record.id, provider=fallback.provider, error=repr(exc))
            await self._jobs.record_routing(record.id, provider=fallback.provider, routing_reason=fallback.reason.value)
            if self._metrics is not None:
                await self._metrics.routed(fallback.provider, fallback.reason.value)
            return await self._render_on(fallback.provider, job)

    async def _render_on(self, provider: str, job: RenderJob) -> RenderOutcome:
        backend = self._backend if self._router is None or provider == LOCAL else self._router.backend(provider)
        try:
            outcome = await backend.render(job, self._stage_callback(job.job_id))
        except (JobCanceled, PermanentError, NonFiniteOutput):
            raise  # the job's own outcome, not a sign of a failing provider
        except Exception:
            if self._router is not None:
                self._router.record(provider, ok=False)
            raise
        if self._router is not None:
            self._router.record(provider, ok=True)
        return outcome

    def _cost_fields(self, outcome: RenderOutcome) -> _CostFields:
        """What the job cost: a provider's credits, or its measured GPU-seconds."""
        if self._prices is None:
            return {}
        credits = outcome.credits if isinstance(outcome, ProviderOutcome) else None
        if credits is not None:
            return {"cost_usd": self._prices.credits_cost(credits), "provider_credits": credits}
        return {"cost_usd": self._prices.gpu_cost(outcome.gpu_seconds)}

    async def abandon(self, queued: QueuedJob, reason: str) -> None:
        """The queue gave up on a job whose runs kept ending with their worker (a poison job
        that crashes it): the job ends in `error` and lands in the dead-letter view."""
        record = await self._jobs.get(queued.job_id)
        if record is None or record.status.terminal:
            return
        runs = max(record.attempts, 1)
        await self._fail(record.id, "worker_lost", f"The job stopped its worker {runs} times ({reason}).")

    def _failure_cost(self, exc: BaseException) -> _CostFields:
        """A provider task that failed may still have been charged (Runway reports its credits)."""
        if self._prices is None or not isinstance(exc, ProviderTaskFailed) or exc.credits is None:
            return {}
        return {"cost_usd": self._prices.credits_cost(exc.credits), "provider_credits": exc.credits}

    async def _start(self, record: JobRecord, decision: RoutingDecision | None = None) -> JobRecord:
        if record.status is JobStatus.PROCESSING:
            # The previous holder died mid-job and the queue handed the job to us: take it over.
            await self._transition(record.id, JobStatus.QUEUED, stage="requeued")
        queue_wait = (datetime.now(timezone.utc) - _aware(record.created_at)).total_seconds()
        timings = {"queue_wait_s": round(queue_wait, 4)} if record.started_at is None else {}
        routing: _RoutingFields = {}
        if decision is not None and decision.reason is not RoutingReason.RESUMED:  # a resume keeps its reason
            routing = {"provider": decision.provider, "routing_reason": decision.reason.value}
        return await self._transition(
            record.id,
            JobStatus.PROCESSING,
            stage=Stage.LOADING.value,
            progress=0.0,
            attempts=record.attempts + 1,
            timings=timings,
            **routing,
        )

    def _stage_callback(self, job_id: str) -> StageCallback:
        async def on_stage(stage: Stage, progress: float) -> None:
            await self._lifecycle.progress(job_id, stage=stage.value, progress=progress)

        return on_stage

    async def _complete(self, record: JobRecord, job: RenderJob, outcome: RenderOutcome, seconds: float) -> None:
        mp4 = outcome.objects.get("mp4")
        thumb = outcome.objects.get("thumbnail")
        timings = {**outcome.timings, "processing_s": round(seconds, 4)}
        total = (datetime.now(timezone.utc) - _aware(record.created_at)).total_seconds()
        timings["total_s"] = round(total, 4)
        try:
            await self._transition(
                record.id,
                JobStatus.COMPLETED,
                stage=Stage.DONE.value,
                progress=1.0,
                result_url=mp4.uri if mp4 else None,
                thumbnail_url=thumb.uri if thumb else None,
                outputs={kind: stored.to_json() for kind, stored in outcome.objects.items()},
                gpu_seconds=outcome.gpu_seconds,
                timings=timings,
                **self._cost_fields(outcome),
            )
        except InvalidTransition:
            # Canceled while we finished: the cancel is the visible outcome, so drop our outputs.
            log.info("job_outputs_discarded", job_id=record.id)
            await self._backend.discard(job)
            return
        log.info("job_completed", job_id=record.id, owner_id=record.owner_id, seconds=round(seconds, 3))

    async def _finish_canceled(self, job_id: str) -> None:
        try:
            await self._transition(job_id, JobStatus.CANCELED, stage="canceled")
        except (InvalidTransition, NotFound):
            pass  # already canceled by the ingress (the usual case) or gone
        log.info("job_canceled", job_id=job_id)

    async def _fail(self, job_id: str, code: str, message: str, cost: _CostFields | None = None) -> None:
        try:
            await self._transition(
                job_id, JobStatus.ERROR, error_code=code, error_message=message[:2000], **(cost or {})
            )
        except InvalidTransition:
            pass  # canceled meanwhile; that outcome stands
        log.error("job_failed", job_id=job_id, code=code, error=message)

    async def _requeue(self, job_id: str, exc: Exception) -> None:
        try:  # the lifecycle counts it as `retrying`
            await self._transition(
                job_id, JobStatus.QUEUED, stage=RETRYING_STAGE, error_code="attempt_failed",
                error_message=str(exc)[:2000],
            )
        except InvalidTransition:
            return

    async def _transition(self, job_id: str, to: JobStatus, **fields: Unpack[JobChanges]) -> JobRecord:
        """Every status change the runner makes, through the job's lifecycle."""
        return await self._lifecycle.transition(job_id, to, **fields)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def queue_consumer(settings: Settings, runner: JobRunner) -> QueueConsumer:
    """The queue consumer that feeds `runner`, configured the same wherever a dispatcher runs."""
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: the dispatcher needs the queue's Redis.")
    return QueueConsumer(
        settings.redis_url,
        settings.queue_name,
        runner.handle,
        concurrency=settings.dispatcher_concurrency,
        lock_duration_ms=settings.lock_duration_ms,
        stalled_interval_ms=settings.lock_duration_ms,
        # A job whose runs keep killing their worker gets as many runs as any job's attempts.
        max_stalled_count=max(settings.job_attempts - 1, 0),
        on_abandoned=runner.abandon,
    )
