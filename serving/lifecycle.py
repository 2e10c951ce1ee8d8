"""The one owner of a job's lifecycle: every change writes the row, then announces it.

The ingress (submission, cache hits, cancel, retry) and the runner (start, progress, outcome)
change a job only through a `JobLifecycle`, which does, in this order: the guarded write in the
job store (`JobRepository`, which refuses a second terminal state), the event and outcome webhook
(`JobEventSink`), and the job metrics (`JobMetrics`). Progress goes to the row and through the
one progress writer (`serving.progress`). Nothing else tells the sink or counts a finished job,
so the three cannot drift apart. One write bypasses it on purpose: a drain's hand-back
(`serving.worker.drain.requeue_in_store`) only puts the row back to `queued` (no outcome, nothing
to count); the next attempt's start announces the job again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from serving.db.jobs import JobChanges, JobRecord, JobRepository
from serving.events import JobEventSink, SinkGroup
from serving.observability.job_metrics import JobMetrics
from serving.progress import ProgressReport, ProgressWriter
from serving.types import JobStatus

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = structlog.get_logger(__name__)

# The stage of a job put back in the queue after a failed attempt: counted as `retrying`.
RETRYING_STAGE = "retrying"


class JobLifecycle:
    """Creates jobs and moves them between states, announcing and counting each change."""

    def __init__(
        self,
        jobs: JobRepository,
        sink: JobEventSink | None = None,
        metrics: JobMetrics | None = None,
        progress: ProgressWriter | None = None,
    ) -> None:
        self.jobs = jobs
        self._sink: JobEventSink = sink if sink is not None else SinkGroup()
        self._metrics = metrics  # None where job metrics are not kept (unit tests)
        self._progress = progress  # None: progress is kept in the row only

    async def create(self, **fields: Any) -> JobRecord:
        """Insert a new job (queued). Not announced yet: the ingress announces it once it is
        enqueued, with its queue position (`announce`), or completes it from the cache."""
        return await self.jobs.create(**fields)

    async def delete(self, job_id: str) -> None:
        """Remove a job that was never announced (the undo of `create`)."""
        await self.jobs.delete(job_id)

    async def transition(self, job_id: str, to: JobStatus, **fields: Unpack[JobChanges]) -> JobRecord:
        """The guarded state change, then its announcement. Raises `InvalidTransition` (and
        announces nothing) when the job may not move to `to`."""
        record = await self.jobs.transition(job_id, to, **fields)
        await self.announce(record)
        return record

    async def announce(self, record: JobRecord, *, queue_position: int | None = None, repeat: bool = False) -> None:
        """Tell the sink (event stream, outcome webhook) and the metrics about `record`'s state.
        The sink keeps one outcome per job, so announcing a terminal state again adds nothing to
        what clients see; with `repeat` (a runner that finds a job already final announces it
        once more) the metrics, which would count it twice, are not told."""
        await self._sink.job_changed(record, queue_position=queue_position)
        if repeat:
            return
        if self._metrics is not None and (record.status.terminal or record.stage == RETRYING_STAGE):
            try:
                await self._metrics.finished(record)
            except Exception as exc:  # a lost count must not fail the job
                log.warning("job_metrics_failed", job_id=record.id, error=repr(exc))

    async def progress(
        self, job_id: str, *, stage: str, progress: float, step: int | None = None, steps: int | None = None
    ) -> None:
        """Record where a running job is: in its row, and (live) in its progress hash and events."""
        await self.jobs.update_progress(job_id, progress=progress, stage=stage)
        if self._progress is None:
            return
        try:
            await self._progress.write(ProgressReport(job_id, stage, progress, step, steps))
        except Exception as exc:  # a missed progress event must not fail the job
            log.warning("progress_write_failed", job_id=job_id, stage=stage, error=repr(exc))
