"""Job-level worker metrics, observed by the Dispatcher from what the jobs row already holds."""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from serving.provider_names import LOCAL
from serving.db.jobs import JobRecord
from serving.keys import Keys
from serving.metrics import (
    JOB_COST_USD,
    JOB_STAGE_SECONDS,
    JOBS_FINISHED,
    OWNER_COST_USD,
    OWNER_GPU_SECONDS,
    PROVIDER_ROUTING,
    MetricBatch,
)
from serving.types import JobStatus

# timings key in the jobs row -> `stage` label of svd_job_stage_duration_seconds
STAGE_TIMINGS: dict[str, str] = {
    "queue_wait_s": "queue_wait",
    "inference_s": "inference",
    "encode_s": "postprocessing",
    "upload_s": "upload",
    "total_s": "end_to_end",
}


def stage_seconds(timings: Mapping[str, float]) -> dict[str, float]:
    """The stage durations a job's timings contain, by stage label."""
    return {stage: float(timings[key]) for key, stage in STAGE_TIMINGS.items() if key in timings}


def job_cost_usd(record: JobRecord, gpu_hour_price_usd: float) -> float:
    """The job's recorded cost, or its GPU seconds at the configured price when none is recorded."""
    if record.cost_usd is not None:
        return float(record.cost_usd)
    return float(record.gpu_seconds or 0.0) * gpu_hour_price_usd / 3600.0


class JobMetrics:
    """What the JobRunner reports: routing decisions, terminal states, stage latencies, cost."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, gpu_hour_price_usd: float) -> None:
        self._redis = redis
        self._keys = keys
        self._gpu_hour_price_usd = gpu_hour_price_usd

    async def routed(self, provider: str, reason: str) -> None:
        batch = MetricBatch(self._keys)
        batch.inc(PROVIDER_ROUTING, {"provider": provider, "reason": reason})
        await batch.aflush(self._redis)

    async def finished(self, record: JobRecord) -> None:
        """A job reached `record.status`: a terminal state, or queued again after a failed
        attempt. Completed jobs also give their stage latencies and cost; every ended job that
        used a GPU or a paid provider (a failed Runway task is charged) adds to its owner's spend."""
        batch = MetricBatch(self._keys)
        status = record.status.value if record.status.terminal else "retrying"
        batch.inc(JOBS_FINISHED, {"status": status, "model": record.model})
        provider = record.provider or LOCAL
        cost = job_cost_usd(record, self._gpu_hour_price_usd)
        if record.status is JobStatus.COMPLETED:
            for stage, seconds in stage_seconds(record.timings).items():
                batch.observe(JOB_STAGE_SECONDS, {"stage": stage, "model": record.model}, seconds)
            batch.observe(JOB_COST_USD, {"provider": provider, "model": record.model}, cost)
        if record.status.terminal and (record.status is JobStatus.COMPLETED or cost > 0):
            batch.inc(OWNER_COST_USD, {"owner": record.owner_id, "provider": provider}, cost)
            batch.inc(OWNER_GPU_SECONDS, {"owner": record.owner_id}, float(record.gpu_seconds or 0.0))
        await batch.aflush(self._redis)
