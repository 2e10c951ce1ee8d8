"""Draining a dispatcher on SIGTERM or a spot-preemption notice (issue #5).

Stop taking jobs; let a job finish when it is expected to end within the grace period; hand every
other job back to the queue at once (not after its lease lapses) so that another worker starts it
now; hand back whatever is still running when the grace period ends. A handed-back job moves
processing -> queued in the jobs row so its status says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from serving.db.jobs import JobRepository
from serving.errors import InvalidTransition, NotFound
from serving.keys import Keys
from serving.queue import ActiveJob, QueueConsumer
from serving.types import JobStatus

log = structlog.get_logger(__name__)

# Seconds a job is still expected to run, or None when nothing is known yet.
RemainingEstimate = Callable[[ActiveJob], Awaitable[float | None]]
# Runs for a handed-back job before the queue offers it to another worker.
JobHandedBack = Callable[[str], Awaitable[None]]
# Estimates are rough (the last steps and the encoding are not measured): keep a margin.
SAFETY = 0.8


@dataclass
class DrainReport:
    """What a drain did: jobs it let finish and jobs it handed back."""

    finished: list[str] = field(default_factory=list)
    handed_back: list[str] = field(default_factory=list)


def remaining_from_progress(elapsed_s: float, progress: float) -> float | None:
    """Linear extrapolation: a job `progress` done after `elapsed_s` needs this much more."""
    if progress <= 0.0:
        return None
    if progress >= 1.0:
        return 0.0
    return elapsed_s * (1.0 - progress) / progress


def progress_estimate(redis: aioredis.Redis, keys: Keys) -> RemainingEstimate:
    """Remaining time from the progress the Generator writes to Redis (`Keys.progress`)."""

    async def estimate(job: ActiveJob) -> float | None:
        raw = await redis.hget(keys.progress(job.job_id), "progress")
        if raw is None:
            return None
        return remaining_from_progress(time.monotonic() - job.started, float(raw))

    return estimate


def requeue_in_store(jobs: JobRepository) -> JobHandedBack:
    """A handed-back job is queued again in the system of record."""

    async def requeued(job_id: str) -> None:
        try:
            await jobs.transition(job_id, JobStatus.QUEUED, stage="requeued")
        except (InvalidTransition, NotFound):
            pass  # canceled or finished meanwhile; that outcome stands

    return requeued


class Drainer:
    """Runs one drain of a `QueueConsumer`; a second call waits for the first."""

    def __init__(
        self,
        consumer: QueueConsumer,
        estimate: RemainingEstimate,
        on_handed_back: JobHandedBack,
        grace_s: float,
    ) -> None:
        self._consumer = consumer
        self._estimate = estimate
        self._on_handed_back = on_handed_back
        self._grace_s = grace_s
        self._task: asyncio.Task[DrainReport] | None = None

    @property
    def draining(self) -> bool:
        return self._task is not None

    async def drain(self, reason: str, grace_s: float | None = None) -> DrainReport:
        """Drain once; `grace_s` shortens the grace period (a node that goes away sooner)."""
        if self._task is None:
            grace = self._grace_s if grace_s is None else max(0.0, min(self._grace_s, grace_s))
            self._task = asyncio.create_task(self._drain(reason, grace), name="dispatcher-drain")
        return await asyncio.shield(self._task)

    async def _drain(self, reason: str, grace_s: float) -> DrainReport:
        deadline = time.monotonic() + grace_s
        log.warning("drain_started", reason=reason, grace_s=grace_s)
        await self._consumer.stop_taking_jobs()
        report = DrainReport()
        keep: list[ActiveJob] = []
        give: list[str] = []
        for job in self._consumer.active_jobs:
            remaining = await self._estimate(job)
            fits = remaining is not None and remaining <= SAFETY * (deadline - time.monotonic())
            (keep.append(job) if fits else give.append(job.job_id))
        await self._give_back(give, report)
        pending = {job.task for job in keep}
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        late = [job.job_id for job in keep if not job.task.done()]
        report.finished = [job.job_id for job in keep if job.task.done()]
        await self._give_back(late, report)
        log.warning("drain_done", reason=reason, finished=report.finished, handed_back=report.handed_back)
        return report

    async def _give_back(self, job_ids: list[str], report: DrainReport) -> None:
        report.handed_back.extend(await self._consumer.hand_back(job_ids, self._on_handed_back))


def dispatcher_drainer(
    consumer: QueueConsumer, jobs: JobRepository, redis: aioredis.Redis, keys: Keys, grace_s: float
) -> Drainer:
    """The drain a dispatcher runs on SIGTERM or a preemption notice."""
    return Drainer(consumer, progress_estimate(redis, keys), requeue_in_store(jobs), grace_s)
