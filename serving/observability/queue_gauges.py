"""Queue depth and oldest-job age per priority, read through `serving.queue.JobQueue` on each
scrape (only the queue module knows BullMQ's keys)."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily, Metric

from serving.queue import JobQueue
from serving.types import Priority

UNPRIORITIZED = "none"  # the label of jobs in BullMQ's unprioritized `wait` list


async def queue_families(queue: JobQueue) -> list[Metric]:
    """`svd_queue_depth_jobs` and `svd_queue_oldest_job_age_seconds` per priority, and
    `svd_queue_jobs` per BullMQ state."""
    by_number = {priority.queue_priority: priority.value for priority in Priority}
    waiting = await queue.waiting(list(by_number))
    depth = GaugeMetricFamily("svd_queue_depth_jobs", "Jobs waiting to start, per priority", labels=["priority"])
    age = GaugeMetricFamily(
        "svd_queue_oldest_job_age_seconds",
        "Age of the oldest waiting job per priority (0 when none waits)",
        labels=["priority"],
    )
    for number, line in waiting.items():
        label = by_number[number] if number is not None else UNPRIORITIZED
        depth.add_metric([label], float(line.count))
        age.add_metric([label], line.oldest_age_s)
    states = GaugeMetricFamily("svd_queue_jobs", "Jobs in the queue per BullMQ state", labels=["state"])
    for state, count in (await queue.counts()).items():
        states.add_metric([state], float(count))
    return [depth, age, states]
