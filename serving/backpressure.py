"""Backpressure and start estimates from the queue's measured drain rate (issue #5).

The queue is bounded per priority (`max_queued_per_priority`, 429 `queue_full`) and in total
(`max_queued_total`, 503 `service_saturated`); per owner the quota `max_concurrent_jobs` bounds
it already (429 `too_many_concurrent_jobs`). Retry-After is the time the workers need, at the rate
they finished jobs over the last `drain_rate_window_s`, to bring the queue back under its bound.
"""

from __future__ import annotations

import datetime as dt
import math

from serving.errors import QueueFull, ServiceSaturated
from serving.queue import JobQueue, QueueStats
from serving.settings import Settings
from serving.types import Priority

# Without a measured rate (idle or starting workers) we cannot compute a wait: suggest this.
FALLBACK_RETRY_AFTER_S = 30
MAX_RETRY_AFTER_S = 3600


def seconds_to_drain(excess: int, rate_per_s: float) -> int:
    """Whole seconds for `excess` jobs to leave the queue at `rate_per_s` (fallback if none)."""
    if rate_per_s <= 0:
        return FALLBACK_RETRY_AFTER_S
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(excess / rate_per_s)))


def check_admission(stats: QueueStats, priority: Priority, settings: Settings) -> None:
    """Raise `ServiceSaturated` or `QueueFull` when a new job of `priority` would overflow."""
    rate = stats.drain_rate_per_s
    if stats.waiting >= settings.max_queued_total:
        excess = stats.waiting - settings.max_queued_total + 1
        raise ServiceSaturated(
            f"The service is saturated ({stats.waiting} jobs waiting); try again later.",
            retry_after_s=seconds_to_drain(excess, rate),
        )
    waiting = stats.waiting_by_priority.get(priority.queue_priority, 0)
    if waiting >= settings.max_queued_per_priority:
        excess = waiting - settings.max_queued_per_priority + 1
        raise QueueFull(
            f"The {priority.value}-priority queue is full ({waiting} jobs waiting); try again later.",
            retry_after_s=seconds_to_drain(excess, rate),
        )


async def admit(queue: JobQueue, priority: Priority, settings: Settings) -> None:
    """Refuse a new job (before anything is stored) when its queue is at its bound."""
    check_admission(await queue.stats(settings.drain_rate_window_s), priority, settings)


async def confirm_admission(queue: JobQueue, job_id: str, priority: Priority, settings: Settings) -> None:
    """After enqueueing: raise as `admit` would when the job landed beyond a bound. Concurrent
    submissions all pass `admit` before any of them is queued; their places in the queue decide
    which ones stay, so the bounds hold under a burst too."""
    position = await queue.position(job_id)
    rank = await queue.rank_in_priority(job_id, priority.queue_priority)
    if position is None or rank is None:
        return  # already taken by a worker: it is no longer waiting, nothing to bound
    if position < settings.max_queued_total and rank < settings.max_queued_per_priority:
        return
    stats = await queue.stats(settings.drain_rate_window_s)
    if position >= settings.max_queued_total:
        raise ServiceSaturated(
            f"The service is saturated ({stats.waiting} jobs waiting); try again later.",
            retry_after_s=seconds_to_drain(position - settings.max_queued_total + 1, stats.drain_rate_per_s),
        )
    raise QueueFull(
        f"The {priority.value}-priority queue is full; try again later.",
        retry_after_s=seconds_to_drain(rank - settings.max_queued_per_priority + 1, stats.drain_rate_per_s),
    )


def estimated_start(position: int, stats: QueueStats, now: dt.datetime | None = None) -> dt.datetime | None:
    """When a job with `position` jobs ahead of it should start: they leave the queue at the
    measured drain rate. None while no rate has been measured."""
    rate = stats.drain_rate_per_s
    if rate <= 0:
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    return now + dt.timedelta(seconds=(position + 1) / rate)
