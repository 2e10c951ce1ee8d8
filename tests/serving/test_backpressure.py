"""Backpressure (bounded queues, 429/503 with Retry-After from the measured drain rate) and the
estimated start time, on real Redis (BullMQ's keys) and a real ingress over ASGI."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serving.backpressure import FALLBACK_RETRY_AFTER_S, check_admission, estimated_start, seconds_to_drain
from serving.db.migrate import upgrade
from serving.errors import QueueFull, ServiceSaturated
from serving.queue import ConsumedJobInfo, JobQueue, QueueConsumer, QueueStats
from serving.settings import Settings
from serving.types import Priority, QueuedJob
from tests.serving.test_api_keys import App, app_settings, png_bytes, running_app

WAIT_S = 10.0


def stats(waiting: dict[int, int], finished: int = 0, window_s: float = 100.0) -> QueueStats:
    return QueueStats(waiting_by_priority=waiting, waiting_unprioritized=0, active=0, delayed=0,
                      finished_in_window=finished, window_s=window_s, oldest_waiting_age_s=0.0)


def test_admission_limits_and_retry_after() -> None:
    settings = Settings(max_queued_per_priority=3, max_queued_total=5)
    check_admission(stats({1: 2, 2: 2}), Priority.NORMAL, settings)  # under both bounds
    with pytest.raises(QueueFull) as full:
        check_admission(stats({2: 3}, finished=50), Priority.NORMAL, settings)  # 0.5 jobs/s
    assert full.value.status == 429 and full.value.retry_after_s == 2  # one job must leave: 2 s
    check_admission(stats({2: 3}), Priority.HIGH, settings)  # another priority has room
    with pytest.raises(ServiceSaturated) as saturated:
        check_admission(stats({1: 3, 2: 3}, finished=10), Priority.LOW, settings)  # 0.1 jobs/s
    assert saturated.value.status == 503 and saturated.value.retry_after_s == 20  # two must leave
    assert seconds_to_drain(4, 0.0) == FALLBACK_RETRY_AFTER_S


def test_estimated_start() -> None:
    now = dt.datetime(2026, 11, 25, 12, tzinfo=dt.timezone.utc)
    assert estimated_start(3, stats({}, finished=0), now) is None
    assert estimated_start(3, stats({}, finished=50), now) == now + dt.timedelta(seconds=8)


async def finish_jobs(redis_url: str, queue: JobQueue, count: int, priority: Priority = Priority.LOW) -> None:
    """Run `count` jobs through a real consumer so the queue has a measured drain rate."""
    done = asyncio.Event()
    seen: list[str] = []

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        seen.append(job.job_id)
        if len(seen) == count:
            done.set()

    for i in range(count):
        await queue.add(QueuedJob(job_id=f"done-{i}", owner_id="o"), priority=priority, attempts=1, backoff_ms=10)
    consumer = QueueConsumer(redis_url, queue.queue_name, handler)
    await consumer.start()
    await asyncio.wait_for(done.wait(), WAIT_S)
    await consumer.close()


async def test_queue_stats(redis_url: str, unique_prefix: str) -> None:
    queue = JobQueue(redis_url, unique_prefix)
    try:
        await finish_jobs(redis_url, queue, 3)
        for job_id, priority in (("h", Priority.HIGH), ("n1", Priority.NORMAL), ("n2", Priority.NORMAL)):
            await queue.add(QueuedJob(job_id=job_id, owner_id="o"), priority=priority, attempts=1, backoff_ms=10)
        snapshot = await queue.stats(window_s=60)
        assert snapshot.waiting_by_priority == {1: 1, 2: 2, 3: 0} and snapshot.waiting == 3
        assert (snapshot.active, snapshot.delayed, snapshot.finished_in_window) == (0, 0, 3)
        assert snapshot.drain_rate_per_s == pytest.approx(3 / 60)
        assert 0 <= snapshot.oldest_waiting_age_s < WAIT_S
    finally:
        await queue.obliterate()
        await queue.close()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def app(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[App]:
    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path, max_queued_per_priority=2,
                            max_queued_total=3, drain_rate_window_s=300)
    async with running_app(settings) as running:
        yield running


async def submit(client: httpx.AsyncClient, priority: str = "normal") -> httpx.Response:
    return await client.post("/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")},
                             data={"priority": priority})


async def test_bounded_queue_answers_429_then_503(app: App, redis_url: str, unique_prefix: str) -> None:
    async with app.client(await app.new_key(f"bp-{unique_prefix}")) as client:
        first = await submit(client)
        status = (await client.get(f"/api/v1/animate-image/status/{first.json()['jobId']}")).json()
        assert status["queuePosition"] == 0 and status["estimatedStartAt"] is None  # no rate yet
        # Four jobs finished within the 300 s window: 75 s per job.
        await finish_jobs(redis_url, app.services.queue, 4, Priority.HIGH)
        status = (await client.get(f"/api/v1/animate-image/status/{first.json()['jobId']}")).json()
        eta = dt.datetime.fromisoformat(status["estimatedStartAt"]) - dt.datetime.now(dt.timezone.utc)
        assert 60 < eta.total_seconds() <= 75

        assert (await submit(client)).status_code == 202
        objects = len(app.stored_objects())
        full = await submit(client)
        assert full.status_code == 429 and full.json()["code"] == "queue_full", full.text
        assert full.headers["retry-after"] == "75" and full.json()["retryAfter"] == 75
        assert len(app.stored_objects()) == objects and await app.queued() - 4 == 2  # nothing stored

        assert (await submit(client, "high")).status_code == 202  # high has its own bound
        saturated = await submit(client, "low")
        assert saturated.status_code == 503 and saturated.json()["code"] == "service_saturated"
        assert saturated.headers["retry-after"] == "75"
        assert len(app.stored_objects()) == objects + 1


async def test_concurrent_burst_respects_the_bound_exactly(app: App, unique_prefix: str) -> None:
    # All of them pass the check before any is queued; their places in the queue decide.
    async with app.client(await app.new_key(f"burst-{unique_prefix}")) as client:
        answers = await asyncio.gather(*(submit(client) for _ in range(8)))
    codes = sorted(a.status_code for a in answers)
    # The bound of 2 per priority holds: two are kept; the others are refused (429 over the
    # priority's bound, 503 over the total of 3, depending on where they landed meanwhile).
    assert codes[:2] == [202, 202] and set(codes[2:]) <= {429, 503}, [a.text for a in answers]
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code != 202)
    assert await app.queued() == 2 and len(app.stored_objects()) == 2
