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
from serving.queue import ConsumedJobInfo, QueueConsumer
from serving.settings import Settings
from serving.uris import key_from_uri
from serving.types import JobParams, JobStatus, QueuedJob, RenderJob, RenderOutcome, Stage

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = structlog.get_logger(__name__)


class _CostFields(TypedDict, total=False):
    """The cost columns `_complete` sets with the completed transition (issue #6)."""

    cost_usd: float | None
    provider_credits: float | None


class _FailureCost(_CostFields, total=False):
    """What a failed run still cost, set with the error transition (issue #14)."""

    gpu_seconds: float | None


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
        prices: Prices | None = None,
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self._jobs = jobs
        self._backend = backend
        self._redis = redis
        self._keys = keys
        # Every status change and progress report: the row, live events, outcome webhooks, metrics.
        limits = stream_limits or StreamLimits.default()
        self._lifecycle = JobLifecycle(jobs, events, metrics, ProgressWriter(redis, keys, limits))
        # What a job costs (issue #6). Where it runs is the backend's business (issue #14: in the
        # Dispatcher a `RoutedBackend`, which records its routing decision on the job).
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
            # both keep one outcome per job, so a repeat adds nothing); counted once already.
            await self._lifecycle.announce(record, repeat=True)
            return
        if await self._redis.exists(self._keys.cancel(record.id)):
            await self._finish_canceled(record.id)
            return
        record = await self._start(record)
        job = _render_job(record, info)
        log.info("job_started", job_id=record.id, owner_id=record.owner_id, attempt=info.attempt)
        started = time.perf_counter()
        try:
            outcome = await self._backend.render(job, self._stage_callback(job.job_id))
        except JobCanceled:
            await self._finish_canceled(record.id)
            return
        except PermanentError as exc:
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

    def _cost_fields(self, outcome: RenderOutcome) -> _CostFields:
        """What the job cost: as the backend priced it (a provider's USD or credits), else its
        measured GPU-seconds."""
        if isinstance(outcome, ProviderOutcome) and outcome.cost_usd is not None:
            return {"cost_usd": outcome.cost_usd, "provider_credits": outcome.credits}
        if self._prices is None:
            return {}
        return {"cost_usd": self._prices.gpu_cost(outcome.gpu_seconds)}

    async def abandon(self, queued: QueuedJob, reason: str) -> None:
        """The queue gave up on a job whose runs kept ending with their worker (a poison job
        that crashes it): the job ends in `error` and lands in the dead-letter view."""
        record = await self._jobs.get(queued.job_id)
        if record is None or record.status.terminal:
            return
        runs = max(record.attempts, 1)
        await self._fail(record.id, "worker_lost", f"The job stopped its worker {runs} times ({reason}).")

    def _failure_cost(self, exc: PermanentError) -> _FailureCost:
        """A failed run may still have cost money: a provider's task its credits (Runway reports
        them), a local run the GPU time it spent (a NaN video ran its whole denoising loop)."""
        if self._prices is None:
            return {}
        if isinstance(exc, ProviderTaskFailed) and exc.credits is not None:
            return {"cost_usd": self._prices.credits_cost(exc.credits), "provider_credits": exc.credits}
        if exc.gpu_seconds:
            return {"cost_usd": self._prices.gpu_cost(exc.gpu_seconds), "gpu_seconds": exc.gpu_seconds}
        return {}

    async def _start(self, record: JobRecord) -> JobRecord:
        if record.status is JobStatus.PROCESSING:
            # The previous holder died mid-job and the queue handed the job to us: take it over.
            await self._transition(record.id, JobStatus.QUEUED, stage="requeued")
        queue_wait = (datetime.now(timezone.utc) - _aware(record.created_at)).total_seconds()
        timings = {"queue_wait_s": round(queue_wait, 4)} if record.started_at is None else {}
        return await self._transition(
            record.id,
            JobStatus.PROCESSING,
            stage=Stage.LOADING.value,
            progress=0.0,
            attempts=record.attempts + 1,
            timings=timings,
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

    async def _fail(self, job_id: str, code: str, message: str, cost: _FailureCost | None = None) -> None:
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


def _render_job(record: JobRecord, info: ConsumedJobInfo) -> RenderJob:
    """The job as its backend sees it, from the jobs row as this attempt started it."""
    return RenderJob(
        job_id=record.id,
        owner_id=record.owner_id,
        image_key=key_from_uri(record.image_url),
        params=JobParams.from_json(record.params),
        prompt=record.prompt,
        requested_provider=record.requested_provider,
        provider=record.provider,
        provider_task_id=record.provider_job_id,
        last_attempt=info.is_last_attempt,
    )


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
