"""Our job queue: a small interface over BullMQ (Redis), so nothing else in svd-serve imports bullmq.

The ingress uses `JobQueue` (add, remove, position, counts); the dispatcher runs a `QueueConsumer`
whose handler gets a `QueuedJob` plus a `ConsumedJobInfo`. Keys live under `bull:{queue_name}:*` in
BullMQ's own format, so Node tooling (bull-board, Taskforce) can read the queue.

How BullMQ (Python 3.4.4, BullMQ 5 key format) serves jobs, which `position` mirrors:
- `wait` list: jobs without a priority and stalled jobs put back by the stalled checker. New ones are
  LPUSHed, recovered ones RPUSHed, and workers RPOPLPUSH from the right, so the right end goes first.
  Every job in `wait` is served before any prioritized job.
- `prioritized` zset: score = priority * 2^32 + counter, so ZRANK is the order within it
  (lower priority number first, FIFO within a priority).
- `delayed` zset: jobs waiting out a retry backoff; they re-enter `prioritized` when due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import structlog
from bullmq import Job, Queue, UnrecoverableError, Worker
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from serving.errors import PermanentError
from serving.types import Priority, QueuedJob

log = structlog.get_logger(__name__)

JOB_NAME = "animate"

# The jobs row is the system of record, so finished BullMQ jobs are kept only for inspection
# (bull-board, debugging), bounded by age (seconds) and count rather than forever.
KEEP_COMPLETED: dict[str, int] = {"age": 24 * 3600, "count": 1000}
KEEP_FAILED: dict[str, int] = {"age": 7 * 24 * 3600, "count": 10000}

# BullMQ states from which a job may be removed: nobody holds it.
_REMOVABLE_STATES = frozenset({"waiting", "prioritized", "delayed"})
# A WATCH conflict means the job changed state under us; re-checking settles it in one more round.
_REMOVE_ROUNDS = 5
# Producer calls are single quick commands; fail fast when Redis is gone.
_CONNECT_TIMEOUT_S = 2.0
_COMMAND_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ConsumedJobInfo:
    """What the consumer knows about the attempt it hands to the handler."""

    attempt: int  # 1 for the first run; a stalled run that was recovered keeps its number
    max_attempts: int

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


JobHandler = Callable[[QueuedJob, ConsumedJobInfo], Awaitable[None]]


class JobQueue:
    """Producer-side view of the queue: enqueue, dequeue a waiting job, position, counts."""

    def __init__(self, redis_url: str, queue_name: str) -> None:
        self.queue_name = queue_name
        # Our own client: BullMQ's default retries a lost connection for minutes, which would
        # hold an HTTP request hostage instead of letting the ingress answer 503 at once.
        client = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,  # BullMQ's scripts and parsers expect str
            socket_connect_timeout=_CONNECT_TIMEOUT_S,
            socket_timeout=_COMMAND_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._queue = Queue(queue_name, {"connection": client})

    async def close(self) -> None:
        await self._queue.close()

    async def add(
        self, job: QueuedJob, *, priority: Priority, attempts: int, backoff_ms: int
    ) -> None:
        """Enqueue `job` under its own id; adding an id that is already queued is a no-op."""
        await self._queue.add(
            JOB_NAME,
            {"jobId": job.job_id, "ownerId": job.owner_id},
            {
                "jobId": job.job_id,
                # Always set: an unprioritized job would be served before every prioritized one.
                "priority": priority.queue_priority,
                "attempts": attempts,
                "backoff": {"type": "exponential", "delay": backoff_ms},
                "removeOnComplete": KEEP_COMPLETED,
                "removeOnFail": KEEP_FAILED,
            },
        )

    async def remove(self, job_id: str) -> bool:
        """Remove a job nobody holds (waiting, prioritized or delayed). False when it is active,
        finished or absent: a job a worker holds is never removed."""
        keys = self._queue.keys
        job_key = self._queue.toKey(job_id)
        remove_script = self._queue.scripts.commands["removeJob"]
        for _ in range(_REMOVE_ROUNDS):
            async with self._queue.client.pipeline(transaction=True) as pipe:
                # Every move out of wait/prioritized/delayed (to active, or a delayed job's
                # promotion) writes the job hash in the same script, so watching it makes the
                # state check and the removal one atomic step.
                await pipe.watch(job_key)
                state = await self._queue.getJobState(job_id)
                if state not in _REMOVABLE_STATES:
                    return False
                pipe.multi()
                # BullMQ's own removal script (events, job keys); it refuses a locked job (0).
                await remove_script(
                    keys=[job_key, keys["repeat"]], args=[job_id, 0, keys[""]], client=pipe
                )
                try:
                    (result,) = await pipe.execute()
                except WatchError:
                    continue
                return result == 1
        log.warning("queue_remove_contended", job_id=job_id, rounds=_REMOVE_ROUNDS)
        return False

    async def position(self, job_id: str) -> int | None:
        """Number of jobs served before this one (0 = next), or None if it is not waiting
        (active, delayed for a retry, finished or absent)."""
        keys = self._queue.keys
        async with self._queue.client.pipeline(transaction=True) as pipe:
            # One MULTI so that the list length and the ranks come from the same instant.
            pipe.llen(keys["wait"])
            pipe.lpos(keys["wait"], job_id)
            pipe.zrank(keys["prioritized"], job_id)
            wait_len, wait_index, prioritized_rank = await pipe.execute()
        if wait_index is not None:
            # Workers pop the right end of `wait`: what lies to the right goes first.
            return int(wait_len) - 1 - int(wait_index)
        if prioritized_rank is not None:
            return int(wait_len) + int(prioritized_rank)
        return None

    async def counts(self) -> dict[str, int]:
        """Job counts: waiting (plain and prioritized), active, delayed, completed, failed."""
        raw = await self._queue.getJobCounts(
            "waiting", "prioritized", "active", "delayed", "completed", "failed"
        )
        return {
            "waiting": raw["waiting"] + raw["prioritized"],
            "active": raw["active"],
            "delayed": raw["delayed"],
            "completed": raw["completed"],
            "failed": raw["failed"],
        }

    async def obliterate(self) -> None:
        """Delete the whole queue, active jobs included (tests and maintenance only)."""
        await self._queue.obliterate(force=True)


class QueueConsumer:
    """Runs `handler` for each job: return = completed; `PermanentError` = failed without retry;
    any other exception = a failed attempt, retried with backoff until attempts run out.

    Lock renewal runs on this event loop, so the handler must keep GPU and ffmpeg work off it
    (await a Ray call or a thread); otherwise the lock lapses and the job runs twice.
    """

    def __init__(
        self,
        redis_url: str,
        queue_name: str,
        handler: JobHandler,
        *,
        concurrency: int = 1,
        lock_duration_ms: int = 30000,
        stalled_interval_ms: int = 30000,
        max_stalled_count: int = 1,
    ) -> None:
        self.queue_name = queue_name
        self._handler = handler
        self._opts: dict[str, Any] = {
            "connection": redis_url,
            "concurrency": concurrency,
            "lockDuration": lock_duration_ms,
            "stalledInterval": stalled_interval_ms,
            # Times a job may be recovered after its worker vanished before BullMQ fails it.
            "maxStalledCount": max_stalled_count,
            # We start the loop ourselves in start(), on the running event loop.
            "autorun": False,
        }
        self._worker: Worker | None = None
        self._run_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin consuming on the running event loop."""
        if self._worker is not None:
            raise RuntimeError("QueueConsumer already started")
        worker = Worker(self.queue_name, self._process, self._opts)
        worker.on("error", self._on_error)
        worker.on("failed", self._on_failed)
        # Until it has asked the server for its version, BullMQ assumes Redis < 6 and rounds
        # every blocking wait up to whole seconds, which stretches short retry backoffs to 1 s.
        try:
            await worker.backend.blocking_connection.getRedisVersion()
        except BaseException:
            await worker.close(force=True)  # Redis unreachable: release the connections
            raise
        self._worker = worker
        self._run_task = asyncio.create_task(worker.run(), name=f"queue-consumer:{self.queue_name}")
        self._run_task.add_done_callback(self._on_run_done)

    async def close(self, wait_for_active: bool = True) -> None:
        """Stop taking jobs. With `wait_for_active`, let the running handlers finish; without it,
        cancel them and leave their jobs active: once the lock lapses the stalled checker of
        another consumer puts them back in the queue."""
        worker, run_task = self._worker, self._run_task
        if worker is None or run_task is None:
            return
        self._worker = self._run_task = None
        await worker.close(force=not wait_for_active)
        # asyncio.wait, not await: a forced close ends the run loop with the handlers'
        # CancelledError, which must not look like a cancellation of close() itself.
        await asyncio.wait([run_task])

    async def _process(self, job: Job, token: str) -> None:
        """BullMQ processor: translate the job, run the handler, map our errors onto BullMQ's."""
        try:
            queued = QueuedJob(job_id=str(job.data["jobId"]), owner_id=str(job.data["ownerId"]))
        except (KeyError, TypeError) as exc:
            raise UnrecoverableError(f"malformed queue job {job.id}: {exc!r}") from exc
        info = ConsumedJobInfo(
            attempt=job.attemptsMade + 1,
            max_attempts=max(int(job.opts.get("attempts") or 1), 1),
        )
        try:
            await self._handler(queued, info)
        except PermanentError as exc:
            # UnrecoverableError makes BullMQ fail the job now, whatever attempts remain.
            raise UnrecoverableError(f"{exc.code}: {exc.message}") from exc

    def _on_error(self, err: BaseException, job: Job | None = None) -> None:
        log.error(
            "queue_consumer_error",
            queue=self.queue_name,
            job_id=job.id if job is not None else None,
            error=repr(err),
        )

    def _on_failed(self, job: Job, err: BaseException) -> None:
        log.warning(
            "queue_job_attempt_failed",
            queue=self.queue_name,
            job_id=job.id,
            attempts_made=job.attemptsMade,
            error=repr(err),
        )

    def _on_run_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "queue_consumer_stopped", queue=self.queue_name, error=repr(task.exception())
            )
