"""Queue depth and oldest-job age per priority, read from the queue's Redis keys on each scrape.

BullMQ keeps waiting jobs in `bull:{queue}:prioritized` (a zset scored priority * 2^32 + counter,
so a score range is one priority and its lowest score its oldest job) and in `bull:{queue}:wait`
(jobs without a priority, served first; the right end goes next). Each job hash has `timestamp`
(ms, when it was added). Reads only; the layout is documented in `serving.queue`.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from prometheus_client.core import GaugeMetricFamily, Metric

from serving.queue import JobQueue
from serving.types import Priority

BULL_PREFIX = "bull"  # BullMQ's default key prefix, which JobQueue keeps
_PRIORITY_SPAN = 2**32


def _key(queue_name: str, suffix: str) -> str:
    return f"{BULL_PREFIX}:{queue_name}:{suffix}"


async def queue_families(client: aioredis.Redis, queue: JobQueue) -> list[Metric]:
    """`svd_queue_depth_jobs` and `svd_queue_oldest_job_age_seconds` per priority, and
    `svd_queue_jobs` per BullMQ state."""
    name = queue.queue_name
    prioritized = _key(name, "prioritized")
    async with client.pipeline(transaction=False) as pipe:
        for priority in Priority:
            low = priority.queue_priority * _PRIORITY_SPAN
            pipe.zcount(prioritized, low, low + _PRIORITY_SPAN - 1)
            pipe.zrangebyscore(prioritized, low, low + _PRIORITY_SPAN - 1, start=0, num=1)
        pipe.llen(_key(name, "wait"))
        pipe.lindex(_key(name, "wait"), -1)
        replies = await pipe.execute()

    depth = GaugeMetricFamily("svd_queue_depth_jobs", "Jobs waiting to start, per priority", labels=["priority"])
    age = GaugeMetricFamily(
        "svd_queue_oldest_job_age_seconds",
        "Age of the oldest waiting job per priority (0 when none waits)",
        labels=["priority"],
    )
    oldest_ids: list[tuple[str, str | None]] = []
    for index, priority in enumerate(Priority):
        count, first = replies[2 * index], replies[2 * index + 1]
        depth.add_metric([priority.value], float(count))
        oldest_ids.append((priority.value, _text(first[0]) if first else None))
    wait_len, wait_next = replies[-2], replies[-1]
    # Jobs without a priority (not added by us, or put back by an old BullMQ): served first.
    depth.add_metric(["none"], float(wait_len))
    oldest_ids.append(("none", _text(wait_next) if wait_next is not None else None))

    now_ms = time.time() * 1000
    async with client.pipeline(transaction=False) as pipe:
        for _label, job_id in oldest_ids:
            if job_id is not None:
                pipe.hget(_key(name, job_id), "timestamp")
        stamps = iter(await pipe.execute())
    for label, job_id in oldest_ids:
        seconds = 0.0
        if job_id is not None:
            stamp = next(stamps)
            if stamp is not None:
                seconds = max(0.0, (now_ms - float(_text(stamp))) / 1000)
        age.add_metric([label], seconds)

    states = GaugeMetricFamily("svd_queue_jobs", "Jobs in the queue per BullMQ state", labels=["state"])
    for state, count in (await queue.counts()).items():
        states.add_metric([state], float(count))
    return [depth, age, states]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
