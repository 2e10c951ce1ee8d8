"""The dispatcher's per-job logic on a real job store and real Redis, one backend per failure mode
(cog's fixture-per-failure style): success, crash, cancel, and a cancel that beats completion."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from serving.backend import StageCallback
from serving.cost import Prices
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import upgrade
from serving.errors import JobCanceled, PermanentError, RetryableError
from serving.keys import Keys
from serving.metrics import read_worker_metrics
from serving.observability.job_metrics import JobMetrics
from serving.queue import ConsumedJobInfo
from serving.types import JobParams, JobStatus, QueuedJob, RenderJob, RenderOutcome, Stage, StoredObject
from serving.worker.runner import JobRunner

PARAMS = JobParams(
    model="tiny-random", width=64, height=64, num_frames=4, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=1, min_guidance_scale=1.0, max_guidance_scale=3.0,
)


@dataclass
class ScriptedBackend:
    """Does what the test says: return outputs, raise, or wait on a gate first."""

    name: str = "scripted"
    error: BaseException | None = None
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    discarded: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        await on_stage(Stage.DENOISING, 0.0)
        self.stages.append(Stage.DENOISING)
        self.entered.set()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout=10)
        if self.error is not None:
            raise self.error
        key = f"{job.owner_id}/{job.job_id}/video.mp4"
        return RenderOutcome(
            objects={"mp4": StoredObject("video.mp4", key, f"local://{key}", "video/mp4", 10)},
            gpu_seconds=1.5,
            device="cpu",
            timings={"inference_s": 1.5},
        )

    async def discard(self, job: RenderJob) -> None:
        self.discarded.append(job.job_id)


@dataclass
class Env:
    jobs: JobRepository
    redis: aioredis.Redis
    keys: Keys

    async def new_job(self) -> str:
        job_id = str(uuid.uuid4())
        await self.jobs.create(
            job_id=job_id, owner_id="o1", image_url=f"local://o1/{job_id}/input.png",
            params=PARAMS.to_json(), model="tiny-random", priority="normal",
        )
        return job_id

    def runner(self, backend: ScriptedBackend) -> JobRunner:
        return JobRunner(self.jobs, backend, self.redis, self.keys)


@pytest.fixture(params=["postgresql", "sqlite"])
async def env(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, unique_prefix: str) -> AsyncIterator[Env]:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_database_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield Env(JobRepository(make_session_factory(engine)), client, Keys(unique_prefix))
    finally:
        await client.aclose()
        await engine.dispose()


def info(attempt: int, max_attempts: int = 3) -> ConsumedJobInfo:
    return ConsumedJobInfo(attempt=attempt, max_attempts=max_attempts)


async def test_success_completes_with_outputs_and_timings(env: Env) -> None:
    job_id = await env.new_job()
    await env.runner(ScriptedBackend()).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED
    assert job.result_url == f"local://o1/{job_id}/video.mp4" and job.thumbnail_url is None
    assert job.progress == 1.0 and job.attempts == 1 and job.gpu_seconds == 1.5
    assert {"queue_wait_s", "inference_s", "processing_s", "total_s"} <= set(job.timings)
    assert job.started_at is not None and job.completed_at is not None


async def test_failure_requeues_then_fails_on_last_attempt(env: Env) -> None:
    job_id = await env.new_job()
    backend = ScriptedBackend(error=RuntimeError("CUDA error: device lost"))
    with pytest.raises(RetryableError):
        await env.runner(backend).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.QUEUED and job.attempts == 1

    with pytest.raises(PermanentError):
        await env.runner(backend).handle(QueuedJob(job_id, "o1"), info(3))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.ERROR and job.attempts == 2
    assert job.error_code == "generation_failed" and "device lost" in (job.error_message or "")


async def test_permanent_error_is_not_retried(env: Env) -> None:
    job_id = await env.new_job()
    with pytest.raises(PermanentError):
        await env.runner(ScriptedBackend(error=PermanentError("image unreadable"))).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.ERROR and "image unreadable" in (job.error_message or "")


async def test_a_failed_local_run_is_charged_its_gpu_time(env: Env) -> None:
    """A NaN video (PermanentError from the Generator) still spent GPU time: the failed job
    records it and its cost, so the owner's spend counts failed jobs too (issue #14)."""
    job_id = await env.new_job()
    prices = Prices(gpu_hour_usd=3.6, credit_usd=0.01, credits_per_second=5)
    runner = JobRunner(env.jobs, ScriptedBackend(error=PermanentError("non-finite video", gpu_seconds=2.0)),
                       env.redis, env.keys, prices=prices)
    with pytest.raises(PermanentError):
        await runner.handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.ERROR
    assert job.gpu_seconds == 2.0 and job.cost_usd == pytest.approx(0.002)


async def test_cancel_during_render_ends_canceled(env: Env) -> None:
    job_id = await env.new_job()
    await env.runner(ScriptedBackend(error=JobCanceled("stop"))).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELED and job.result_url is None


async def test_cancel_flag_set_before_start_means_it_never_runs(env: Env) -> None:
    job_id = await env.new_job()
    await env.redis.set(env.keys.cancel(job_id), "1")
    backend = ScriptedBackend()
    await env.runner(backend).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELED and job.attempts == 0
    assert backend.stages == []


async def test_cancel_that_beats_completion_discards_outputs(env: Env) -> None:
    job_id = await env.new_job()
    backend = ScriptedBackend(gate=asyncio.Event())
    task = asyncio.create_task(env.runner(backend).handle(QueuedJob(job_id, "o1"), info(1)))
    await asyncio.wait_for(backend.entered.wait(), timeout=10)
    await env.jobs.transition(job_id, JobStatus.CANCELED)  # what DELETE does while it renders
    backend.gate.set()  # type: ignore[union-attr]
    await asyncio.wait_for(task, timeout=10)
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELED and job.result_url is None
    assert backend.discarded == [job_id]


async def test_already_final_or_missing_jobs_are_skipped(env: Env) -> None:
    job_id = await env.new_job()
    await env.jobs.transition(job_id, JobStatus.CANCELED)
    backend = ScriptedBackend()
    await env.runner(backend).handle(QueuedJob(job_id, "o1"), info(1))
    await env.runner(backend).handle(QueuedJob(str(uuid.uuid4()), "o1"), info(1))
    assert backend.stages == []


async def test_a_job_found_already_final_is_announced_but_not_counted_again(env: Env) -> None:
    """The ingress canceled (and counted) a job a worker had already taken from the queue: the
    runner announces it once more for the sink, but `svd_jobs_finished_total` keeps one count."""
    job_id = await env.new_job()
    metrics = JobMetrics(env.redis, env.keys, gpu_hour_price_usd=1.0)
    canceled = await env.jobs.transition(job_id, JobStatus.CANCELED)
    await metrics.finished(canceled)  # the ingress's count
    runner = JobRunner(env.jobs, ScriptedBackend(), env.redis, env.keys, metrics=metrics)
    await runner.handle(QueuedJob(job_id, "o1"), info(1))
    families = await read_worker_metrics(env.redis, env.keys)
    finished = [s.value for f in families for s in f.samples
                if s.name == "svd_jobs_finished_total" and s.labels["status"] == "canceled"]
    assert finished == [1.0]


async def test_job_left_processing_by_a_dead_worker_is_taken_over(env: Env) -> None:
    job_id = await env.new_job()
    await env.jobs.transition(job_id, JobStatus.PROCESSING, attempts=1)  # the dead worker's attempt
    await env.runner(ScriptedBackend()).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED and job.attempts == 2
