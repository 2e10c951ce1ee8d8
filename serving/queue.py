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
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from bullmq import Job, Queue, UnrecoverableError, Worker
from bullmq.custom_errors import DelayedError
from bullmq.redis_connection import loadScript
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from serving.errors import PermanentError
from serving.redis_clients import (
    COMMAND_TIMEOUT_S,
    CONNECT_TIMEOUT_S,
    blocking_read_timeout,
    check_can_block,
)
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


@dataclass(frozen=True)
class ConsumedJobInfo:
    """What the consumer knows about the attempt it hands to the handler."""

    attempt: int  # 1 for the first run; a stalled run that was recovered keeps its number
    max_attempts: int

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


JobHandler = Callable[[QueuedJob, ConsumedJobInfo], Coroutine[Any, Any, None]]
# Told of a handed-back job after its handler stopped and before the queue offers it again.
BeforeRelease = Callable[[str], Awaitable[None]]
# Told of a job BullMQ failed without running our handler: it stalled (its worker died) more
# than `max_stalled_count` times, a poison job. Gets the job and BullMQ's reason.
AbandonedHandler = Callable[[QueuedJob, str], Awaitable[None]]


@dataclass
class ActiveJob:
    """A job this consumer holds right now (for draining: what to finish, what to hand back)."""

    job_id: str
    token: str
    started: float  # time.monotonic() when the handler began
    task: asyncio.Task[None]
    handed_back: bool = field(default=False)
    before_release: BeforeRelease | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)  # set once handed back


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of the queue for backpressure, start estimates and autoscaling."""

    waiting_by_priority: dict[int, int]  # BullMQ priority (1 high .. 3 low) -> waiting jobs
    waiting_unprioritized: int  # the `wait` list: served before every prioritized job
    active: int
    delayed: int  # waiting out a retry backoff
    finished_in_window: int  # jobs completed or failed within the last `window_s`
    window_s: float
    oldest_waiting_age_s: float  # 0 when nothing waits

    @property
    def waiting(self) -> int:
        return self.waiting_unprioritized + sum(self.waiting_by_priority.values())

    @property
    def drain_rate_per_s(self) -> float:
        """Jobs the workers finished per second, measured over the window."""
        return self.finished_in_window / self.window_s if self.window_s > 0 else 0.0


def _score_range(priority: int) -> tuple[int, int]:
    """The `prioritized` zset's scores of one priority: priority * 2^32 + a counter (see above)."""
    return priority * 2**32, (priority + 1) * 2**32 - 1


@dataclass(frozen=True)
class Waiting:
    """The jobs waiting to start in one priority: how many, and how long the oldest has waited."""

    count: int
    oldest_age_s: float


class JobQueue:
    """Producer-side view of the queue: enqueue, dequeue a waiting job, position, counts."""

    def __init__(self, redis_url: str, queue_name: str) -> None:
        self.queue_name = queue_name
        # Our own client: BullMQ's default retries a lost connection for minutes, which would
        # hold an HTTP request hostage instead of letting the ingress answer 503 at once.
        client = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,  # BullMQ's scripts and parsers expect str
            # Producer calls are single quick commands; fail fast when Redis is gone.
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=COMMAND_TIMEOUT_S,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._queue = Queue(queue_name, {"connection": client})

    async def close(self) -> None:
        await self._queue.close()

    async def consumers(self) -> int | None:
        """How many queue consumers (dispatchers) are connected to Redis right now: BullMQ's
        worker list (CLIENT LIST), each consumer counted once however many connections it holds.
        None where the Redis service does not offer CLIENT LIST."""
        workers = await self._queue.get_workers()
        if any("rawname" not in w for w in workers):
            return None
        return len({w["rawname"] for w in workers if ":w:" in str(w["rawname"])})

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
                return bool(result == 1)
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

    async def waiting(self, priorities: Collection[int]) -> dict[int | None, Waiting]:
        """Waiting jobs per priority, and (key None) in the unprioritized `wait` list (not added
        by us, or put back by an old BullMQ), which is served first."""
        keys = self._queue.keys
        async with self._queue.client.pipeline(transaction=False) as pipe:
            for priority in priorities:
                # FIFO within a priority: a score range's first member is its oldest.
                low, high = _score_range(priority)
                pipe.zcount(keys["prioritized"], low, high)
                pipe.zrangebyscore(keys["prioritized"], low, high, start=0, num=1)
            pipe.llen(keys["wait"])
            pipe.lindex(keys["wait"], -1)  # the right end is served first: the oldest
            replies = await pipe.execute()
        lines: list[tuple[int | None, int, str | None]] = [
            (priority, int(replies[2 * i]), replies[2 * i + 1][0] if replies[2 * i + 1] else None)
            for i, priority in enumerate(priorities)
        ]
        lines.append((None, int(replies[-2]), replies[-1]))
        now_ms = time.time() * 1000
        async with self._queue.client.pipeline(transaction=False) as pipe:
            for _priority, _count, head in lines:
                if head is not None:
                    pipe.hget(self._queue.toKey(head), "timestamp")
            stamps = iter(await pipe.execute())
        result: dict[int | None, Waiting] = {}
        for line_priority, count, head in lines:
            stamp = next(stamps) if head is not None else None
            age = max(0.0, (now_ms - float(stamp)) / 1000) if stamp is not None else 0.0
            result[line_priority] = Waiting(count, age)
        return result

    async def rank_in_priority(self, job_id: str, priority: int) -> int | None:
        """Waiting jobs of `priority` served before this one, or None if it is not prioritized
        and waiting."""
        score = await self._queue.client.zscore(self._queue.keys["prioritized"], job_id)
        if score is None:
            return None
        ahead = await self._queue.client.zcount(self._queue.keys["prioritized"], _score_range(priority)[0], f"({score}")
        return int(ahead)

    async def stats(self, window_s: float, priorities: Collection[int] = (1, 2, 3)) -> QueueStats:
        """Depth per priority, active, delayed, throughput over `window_s` and the oldest wait."""
        waiting = await self.waiting(priorities)
        keys = self._queue.keys
        since = time.time() * 1000 - window_s * 1000
        async with self._queue.client.pipeline(transaction=True) as pipe:
            pipe.llen(keys["active"])
            pipe.zcard(keys["delayed"])
            # Finished sets are scored by finishedOn (ms).
            pipe.zcount(keys["completed"], since, "+inf")
            pipe.zcount(keys["failed"], since, "+inf")
            active, delayed, completed, failed = await pipe.execute()
        return QueueStats(
            waiting_by_priority={priority: waiting[priority].count for priority in priorities},
            waiting_unprioritized=waiting[None].count,
            active=int(active),
            delayed=int(delayed),
            finished_in_window=int(completed) + int(failed),
            window_s=window_s,
            oldest_waiting_age_s=max((line.oldest_age_s for line in waiting.values()), default=0.0),
        )

    async def obliterate(self) -> None:
        """Delete the whole queue, active jobs included (tests and maintenance only)."""
        await self._queue.obliterate(force=True)


def _longest_block_s(worker: Worker) -> float:
    """The longest BZPOPMIN BullMQ's fetch loop issues (`Worker.getBlockTimeout`): the drain
    delay when the queue is empty, else up to its cap until the next delayed job is due."""
    return float(max(worker.opts.get("drainDelay", 5), worker.maximumBlockTimeout, worker.minimumBlockTimeout))


def _pin_timeouts(worker: Worker) -> None:
    """Give BullMQ's two connections read timeouts of our choosing before either connects.

    BullMQ builds them from the URL with redis-py's defaults: under redis-py 8 its blocking
    connection would time out (5 s) in the middle of a BZPOPMIN of up to 10 s on an idle queue.
    The blocking one gets a timeout that outlasts the longest block; the other, which only sends
    quick commands and scripts, the usual command timeout."""
    backend = worker.backend
    plans = ((backend.connection, COMMAND_TIMEOUT_S),
             (backend.blocking_connection, blocking_read_timeout(_longest_block_s(worker))))
    for connection, timeout_s in plans:
        if connection is None:
            continue
        kwargs = connection.conn.connection_pool.connection_kwargs
        kwargs.update(socket_timeout=timeout_s, socket_connect_timeout=CONNECT_TIMEOUT_S)
    if backend.blocking_connection is not None:
        check_can_block(backend.blocking_connection.conn, _longest_block_s(worker), "The queue consumer")


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
        on_abandoned: AbandonedHandler | None = None,
    ) -> None:
        self.queue_name = queue_name
        self._handler = handler
        self._on_abandoned = on_abandoned
        self._background: set[asyncio.Task[None]] = set()
        self._opts: dict[str, Any] = {
            "connection": redis_url,
            "concurrency": concurrency,
            "lockDuration": lock_duration_ms,
            "stalledInterval": stalled_interval_ms,
            # Times a job may be recovered after its worker vanished before BullMQ fails it.
            "maxStalledCount": max_stalled_count,
            # We start the loop ourselves in start(), on the running event loop.
            "autorun": False,
            # Names its Redis connections `bull:{queue}:w:{name}`: `JobQueue.consumers` counts them.
            "name": f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        }
        self._worker: Worker | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._active: dict[str, ActiveJob] = {}

    async def start(self) -> None:
        """Begin consuming on the running event loop."""
        if self._worker is not None:
            raise RuntimeError("QueueConsumer already started")
        worker = Worker(self.queue_name, self._process, self._opts)
        _pin_timeouts(worker)
        worker.on("error", self._on_error)
        worker.on("failed", self._on_failed)
        # Until it has asked the server for its version, BullMQ assumes Redis < 6 and rounds
        # every blocking wait up to whole seconds, which stretches short retry backoffs to 1 s.
        try:
            await worker.backend.blocking_connection.getRedisVersion()
            # Name the connections now rather than in the first turn of `run()`: a consumer is
            # visible (`JobQueue.consumers`) once started, and a close() right after start() no
            # longer races BullMQ's CLIENT SETNAME on the blocking connection (which lost the
            # connection, KeyError in redis-py's pool, and left it open).
            await worker._ensure_client_names()
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
        if self._background:
            await asyncio.wait(set(self._background))
        # asyncio.wait, not await: a forced close ends the run loop with the handlers'
        # CancelledError, which must not look like a cancellation of close() itself.
        await asyncio.wait([run_task])

    @property
    def consuming(self) -> bool:
        """Whether the fetch loop runs. False before `start`, after `close`, and when BullMQ's loop
        ended by itself (it returns on an unexpected error): a consumer that silently takes no
        more jobs, which a health check must see."""
        return self._run_task is not None and not self._run_task.done()

    @property
    def active_jobs(self) -> list[ActiveJob]:
        """The jobs whose handlers run now."""
        return [a for a in self._active.values() if not a.task.done()]

    async def stop_taking_jobs(self) -> None:
        """Take no new job; running handlers go on (the first step of a drain)."""
        if self._worker is not None:
            await self._worker.pause(do_not_wait_active=True)

    async def hand_back(self, job_ids: Collection[str], before_release: BeforeRelease | None = None) -> list[str]:
        """Stop the handlers of `job_ids` and put their jobs back in the queue at once, at the
        front of their priority, without spending an attempt (BullMQ's moveJobFromActiveToWait,
        which releases our lock), so that another consumer starts them now rather than after
        the lease lapses. `before_release` runs first (e.g. the jobs row back to queued, before
        another consumer can start the job). Returns the ids that were handed back."""
        handed: list[str] = []
        for job_id in job_ids:
            active = self._active.get(job_id)
            if active is None or active.task.done():
                continue
            active.handed_back = True
            active.before_release = before_release
            active.task.cancel()
            # _process sees the cancelled handler, moves the job back and sets `released`.
            await active.released.wait()
            handed.append(job_id)
        return handed

    async def _move_back_to_wait(self, job_id: str, token: str) -> None:
        queue_keys = self._worker_keys()
        scripts = self._worker.scripts  # type: ignore[union-attr]
        # BullMQ ships this script (its Node worker uses it for rate-limited jobs) but the Python
        # port does not register it: register it on the worker's own connection once.
        script = scripts.commands.get("moveJobFromActiveToWait")
        if script is None:
            script = scripts.redisClient.register_script(loadScript("moveJobFromActiveToWait-9.lua"))
            scripts.commands["moveJobFromActiveToWait"] = script
        keys = [queue_keys[name] for name in
                ("active", "wait", "stalled", "paused", "meta", "limiter", "prioritized", "marker", "events")]
        result = await script(keys=keys, args=[job_id, token, queue_keys[""] + job_id])
        if isinstance(result, int) and result < 0:
            # -1: the job is gone; -2/-6: our lock lapsed and someone else may hold it. Either
            # way the queue no longer counts on us for it.
            log.warning("queue_hand_back_refused", queue=self.queue_name, job_id=job_id, code=result)

    def _worker_keys(self) -> dict[str, str]:
        assert self._worker is not None
        return self._worker.scripts.keys  # type: ignore[no-any-return]

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
        job_id = str(job.id)
        task = asyncio.create_task(self._handler(queued, info), name=f"job:{job_id}")
        active = self._active[job_id] = ActiveJob(job_id, token, time.monotonic(), task)
        try:
            await asyncio.wait([task])  # a drain cancels `task`, never this coroutine
        except asyncio.CancelledError:
            task.cancel()  # forced close: leave the job locked for the stalled checker
            raise
        finally:
            if self._active.get(job_id) is active:
                del self._active[job_id]
        if active.handed_back and task.cancelled():
            try:
                if active.before_release is not None:
                    await active.before_release(job_id)
                await self._move_back_to_wait(job_id, token)
            finally:
                active.released.set()
            log.info("queue_job_handed_back", queue=self.queue_name, job_id=job_id)
            # BullMQ's way to say "the processor moved this job itself": no completion, no failure.
            raise DelayedError()
        try:
            task.result()
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
        if job.deferredFailure and self._on_abandoned is not None:
            # BullMQ emits synchronously; the store update is async, so run it beside the loop.
            try:
                queued = QueuedJob(job_id=str(job.data["jobId"]), owner_id=str(job.data["ownerId"]))
            except (KeyError, TypeError):
                queued = None
            if queued is not None:
                task = asyncio.get_running_loop().create_task(self._abandon(queued, str(job.deferredFailure)))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        log.warning(
            "queue_job_attempt_failed",
            queue=self.queue_name,
            job_id=job.id,
            attempts_made=job.attemptsMade,
            error=repr(err),
        )

    async def _abandon(self, queued: QueuedJob, reason: str) -> None:
        assert self._on_abandoned is not None
        try:
            await self._on_abandoned(queued, reason)
        except Exception as exc:
            log.error("queue_abandon_failed", queue=self.queue_name, job_id=queued.job_id, error=repr(exc))

    def _on_run_done(self, task: asyncio.Task[None]) -> None:
        if task is not self._run_task:
            return  # closed on purpose
        error = None if task.cancelled() else task.exception()
        log.error("queue_consumer_stopped", queue=self.queue_name, error=repr(error) if error else None)
