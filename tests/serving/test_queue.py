"""JobQueue and QueueConsumer against a real redis-server.

Every test has its own queue (from `unique_prefix`) and obliterates it at the end. Waits are
`asyncio.Event` gates bounded by `asyncio.wait_for`; a consumer closed with `wait_for_active=True`
has finished moving its jobs (completed, failed or delayed) when `close()` returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from bullmq import Queue

from serving.errors import PermanentError, RetryableError
from serving.queue import ConsumedJobInfo, JobHandler, JobQueue, QueueConsumer
from serving.types import Priority, QueuedJob

WAIT_S = 10.0

ConsumerFactory = Callable[..., Awaitable[QueueConsumer]]


def qjob(job_id: str) -> QueuedJob:
    return QueuedJob(job_id=job_id, owner_id=f"owner-{job_id}")


async def add(queue: JobQueue, job_id: str, priority: Priority = Priority.NORMAL, **kw: int) -> None:
    opts = {"attempts": 1, "backoff_ms": 10} | kw
    await queue.add(qjob(job_id), priority=priority, **opts)


async def gate(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), timeout=WAIT_S)


@pytest.fixture
async def queue(redis_url: str, unique_prefix: str) -> AsyncIterator[JobQueue]:
    q = JobQueue(redis_url, unique_prefix)
    try:
        yield q
    finally:
        await q.obliterate()
        await q.close()


@pytest.fixture
async def start_consumer(
    redis_url: str, unique_prefix: str, queue: JobQueue
) -> AsyncIterator[ConsumerFactory]:
    """Starts consumers on the test's queue; any still running are closed before the queue goes."""
    started: list[QueueConsumer] = []

    async def factory(handler: JobHandler, **kw: int) -> QueueConsumer:
        consumer = QueueConsumer(redis_url, unique_prefix, handler, **kw)
        await consumer.start()
        started.append(consumer)
        return consumer

    try:
        yield factory
    finally:
        for consumer in started:
            await consumer.close(wait_for_active=False)


async def test_add_and_consume_one_job(queue: JobQueue, start_consumer: ConsumerFactory) -> None:
    seen: list[tuple[QueuedJob, ConsumedJobInfo]] = []
    done = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        seen.append((job, info))
        done.set()

    await add(queue, "job-1", attempts=3)
    assert (await queue.counts())["waiting"] == 1
    consumer = await start_consumer(handler)
    await gate(done)
    await consumer.close()

    assert seen == [(qjob("job-1"), ConsumedJobInfo(attempt=1, max_attempts=3))]
    assert not seen[0][1].is_last_attempt
    assert await queue.counts() == {
        "waiting": 0, "active": 0, "delayed": 0, "completed": 1, "failed": 0
    }
    assert await queue.position("job-1") is None


async def test_priority_order_and_positions(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    await add(queue, "low", Priority.LOW)
    await add(queue, "normal-1", Priority.NORMAL)
    await add(queue, "high", Priority.HIGH)
    await add(queue, "normal-2", Priority.NORMAL)
    expected = ["high", "normal-1", "normal-2", "low"]

    assert [await queue.position(j) for j in expected] == [0, 1, 2, 3]
    assert await queue.position("missing") is None
    assert (await queue.counts())["waiting"] == 4

    order: list[str] = []
    all_seen = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        order.append(job.job_id)
        if len(order) == len(expected):
            all_seen.set()

    consumer = await start_consumer(handler, concurrency=1)
    await gate(all_seen)
    await consumer.close()

    assert order == expected
    assert [await queue.position(j) for j in expected] == [None] * 4
    assert (await queue.counts())["completed"] == 4


async def test_unprioritized_jobs_go_first_and_position_counts_them(
    redis_url: str, unique_prefix: str, queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    # The plain `wait` list (jobs without a priority, stalled jobs put back) is served before
    # every prioritized job; `position` must count it. Only raw BullMQ adds such jobs.
    await add(queue, "high", Priority.HIGH)
    raw = Queue(unique_prefix, {"connection": redis_url})
    try:
        await raw.add("animate", {"jobId": "plain-1", "ownerId": "o"}, {"jobId": "plain-1"})
        await raw.add("animate", {"jobId": "plain-2", "ownerId": "o"}, {"jobId": "plain-2"})
    finally:
        await raw.close()
    expected = ["plain-1", "plain-2", "high"]
    assert [await queue.position(j) for j in expected] == [0, 1, 2]

    order: list[str] = []
    all_seen = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        order.append(job.job_id)
        if len(order) == len(expected):
            all_seen.set()

    consumer = await start_consumer(handler, concurrency=1)
    await gate(all_seen)
    await consumer.close()
    assert order == expected


async def test_remove_waiting_job(queue: JobQueue, start_consumer: ConsumerFactory) -> None:
    await add(queue, "doomed")
    await add(queue, "kept")
    assert await queue.remove("doomed") is True
    assert await queue.remove("doomed") is False  # absent now
    assert await queue.position("kept") == 0

    seen: list[str] = []
    kept_seen = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        seen.append(job.job_id)
        if job.job_id == "kept":
            kept_seen.set()

    consumer = await start_consumer(handler)
    await gate(kept_seen)
    await consumer.close()
    # FIFO within a priority: "doomed" would have come first had it still been there.
    assert seen == ["kept"]


async def test_remove_active_job_is_refused_and_job_completes(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        calls.append(job.job_id)
        started.set()
        await gate(release)

    await add(queue, "busy")
    consumer = await start_consumer(handler)
    await gate(started)

    assert await queue.remove("busy") is False
    assert await queue.position("busy") is None
    assert (await queue.counts())["active"] == 1

    release.set()
    await consumer.close()
    assert calls == ["busy"]
    assert (await queue.counts())["completed"] == 1
    assert await queue.remove("busy") is False  # finished jobs are not ours to remove


async def test_remove_delayed_job(queue: JobQueue, start_consumer: ConsumerFactory) -> None:
    failed_once = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        failed_once.set()
        raise RetryableError("transient")

    # A long backoff keeps the job delayed for the rest of the test.
    await add(queue, "retrying", attempts=3, backoff_ms=60_000)
    consumer = await start_consumer(handler)
    await gate(failed_once)
    await consumer.close()

    assert (await queue.counts())["delayed"] == 1
    assert await queue.position("retrying") is None
    assert await queue.remove("retrying") is True
    assert (await queue.counts())["delayed"] == 0


async def test_adding_same_id_twice_yields_one_job(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    await add(queue, "dup", Priority.LOW)
    await add(queue, "dup", Priority.HIGH)
    assert (await queue.counts())["waiting"] == 1
    await add(queue, "after")

    seen: list[str] = []
    both_seen = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        seen.append(job.job_id)
        if len(seen) == 2:
            both_seen.set()

    consumer = await start_consumer(handler, concurrency=1)
    await gate(both_seen)
    await consumer.close()
    # The second add changed nothing, its priority included: "dup" stayed low and went last.
    assert seen == ["after", "dup"]
    counts = await queue.counts()
    assert (counts["completed"], counts["waiting"]) == (2, 0)


async def test_retryable_error_is_retried_with_backoff(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    infos: list[ConsumedJobInfo] = []
    succeeded = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        infos.append(info)
        if info.attempt < 3:
            raise RetryableError("try again")
        succeeded.set()

    await add(queue, "flaky", attempts=3, backoff_ms=10)
    consumer = await start_consumer(handler)
    await gate(succeeded)
    await consumer.close()

    assert [i.attempt for i in infos] == [1, 2, 3]
    assert [i.is_last_attempt for i in infos] == [False, False, True]
    assert {i.max_attempts for i in infos} == {3}
    counts = await queue.counts()
    assert (counts["completed"], counts["failed"], counts["delayed"]) == (1, 0, 0)


async def test_permanent_error_is_not_retried(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    attempts: list[int] = []
    raised = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        attempts.append(info.attempt)
        raised.set()
        raise PermanentError("bad image")

    await add(queue, "doomed", attempts=3, backoff_ms=10)
    consumer = await start_consumer(handler)
    await gate(raised)
    await consumer.close()

    assert attempts == [1]
    counts = await queue.counts()
    assert (counts["failed"], counts["delayed"], counts["waiting"]) == (1, 0, 0)


async def test_exhausted_attempts_end_failed(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    infos: list[ConsumedJobInfo] = []
    last_attempt = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        infos.append(info)
        if info.is_last_attempt:
            last_attempt.set()
        raise ValueError("always broken")  # any exception counts as a retryable failure

    await add(queue, "hopeless", attempts=2, backoff_ms=10)
    consumer = await start_consumer(handler)
    await gate(last_attempt)
    await consumer.close()

    assert [i.attempt for i in infos] == [1, 2]
    counts = await queue.counts()
    assert (counts["failed"], counts["delayed"], counts["completed"]) == (1, 0, 0)


async def test_lock_is_renewed_while_handler_awaits_long_work(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    # Work three lock durations long, in a thread as the real handler awaits Ray: with the
    # stalled checker running often, a lapsed lock would put the job back and run it twice.
    lock_ms = 1000
    calls: list[int] = []
    finished = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        calls.append(info.attempt)
        await asyncio.to_thread(time.sleep, 3 * lock_ms / 1000)
        finished.set()

    await add(queue, "long", attempts=3)
    consumer = await start_consumer(
        handler, concurrency=2, lock_duration_ms=lock_ms, stalled_interval_ms=200
    )
    await gate(finished)
    await consumer.close()

    assert calls == [1]
    counts = await queue.counts()
    assert (counts["completed"], counts["waiting"], counts["active"]) == (1, 0, 0)


async def test_job_of_a_vanished_consumer_is_recovered(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    # close(wait_for_active=False) leaves the job active and locked, as a killed worker would;
    # once the lock lapses another consumer's stalled checker puts it back and it runs again.
    lock_ms = 500
    runs: list[str] = []
    first_started, second_done = asyncio.Event(), asyncio.Event()
    never = asyncio.Event()

    async def stuck(job: QueuedJob, info: ConsumedJobInfo) -> None:
        runs.append("first")
        first_started.set()
        await never.wait()

    async def healthy(job: QueuedJob, info: ConsumedJobInfo) -> None:
        runs.append(f"second:{info.attempt}")
        second_done.set()

    await add(queue, "orphan", attempts=3)
    first = await start_consumer(stuck, lock_duration_ms=lock_ms)
    await gate(first_started)
    await first.close(wait_for_active=False)
    assert (await queue.counts())["active"] == 1

    second = await start_consumer(healthy, lock_duration_ms=lock_ms, stalled_interval_ms=200)
    await gate(second_done)
    await second.close()

    # Recovery from a stall is not a failed attempt: the number stays 1.
    assert runs == ["first", "second:1"]
    assert (await queue.counts())["completed"] == 1


async def test_hand_back_requeues_at_once_without_spending_an_attempt(
    queue: JobQueue, start_consumer: ConsumerFactory
) -> None:
    # A long lease: the job must come back because it was handed back, not because a lock lapsed.
    lock_ms = 60000
    runs: list[str] = []
    released: list[str] = []
    started, second_done = asyncio.Event(), asyncio.Event()
    never = asyncio.Event()

    async def stuck(job: QueuedJob, info: ConsumedJobInfo) -> None:
        runs.append(f"first:{info.attempt}")
        started.set()
        await never.wait()

    async def healthy(job: QueuedJob, info: ConsumedJobInfo) -> None:
        runs.append(f"second:{info.attempt}")
        second_done.set()

    async def before_release(job_id: str) -> None:
        # Runs while the job is still ours: nobody else may have started it yet.
        released.append(f"{job_id}:{(await queue.counts())['active']}")

    await add(queue, "low", Priority.LOW)
    await add(queue, "handed", Priority.NORMAL, attempts=3)
    first = await start_consumer(stuck, lock_duration_ms=lock_ms)
    await gate(started)
    await first.stop_taking_jobs()
    assert [a.job_id for a in first.active_jobs] == ["handed"]
    assert await first.hand_back(["handed", "unknown"], before_release) == ["handed"]
    assert released == ["handed:1"] and first.active_jobs == []
    counts = await queue.counts()
    assert (counts["active"], counts["waiting"], counts["failed"]) == (0, 2, 0)
    # Back at the front of its priority, ahead of the low-priority job.
    assert await queue.position("handed") == 0 and await queue.position("low") == 1
    await first.close()

    second = await start_consumer(healthy, lock_duration_ms=lock_ms)
    await gate(second_done)
    await second.close()
    # The hand-back spent no attempt.
    assert runs[:2] == ["first:1", "second:1"]


async def test_consuming_says_whether_the_fetch_loop_runs(queue: JobQueue, start_consumer: ConsumerFactory) -> None:
    """What the Dispatcher's health check reads: true while the loop fetches jobs, false once it
    ended."""
    done = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        done.set()

    consumer = await start_consumer(handler)
    assert consumer.consuming
    await add(queue, "job-1", attempts=1)
    await gate(done)
    assert consumer.consuming
    await consumer.close()
    assert not consumer.consuming
