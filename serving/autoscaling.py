"""Generator autoscaling sized to the job queue (issue #5): a Ray Serve custom autoscaling policy.

Ray Serve's own policy scales on requests in flight at the handles, which for us is at most
`dispatcher_concurrency` per dispatcher: it cannot see the thousands of jobs waiting in Redis.
This policy reads the queue instead (waiting + active, and how long the oldest has waited):

    replicas = ceil(depth / (jobs per replica per minute * target wait in minutes))

at least one more than now when the oldest job has already waited longer than the target, at
least one whenever anything waits, zero when idle (if `min_replicas` is 0), within min/max. Ray
Serve applies `upscale_delay_s`/`downscale_delay_s` (and the min/max bounds) to what this returns.
When the new replicas do not fit, the Ray autoscaler (KubeRay on Kubernetes) adds GPU nodes for
their pending actors; see k8s/README.md.

`desired_replicas` is a pure function of the queue's numbers; `QueueDepthPolicy` is the callable
Ray Serve's controller instantiates once (with `policy_kwargs`) and calls on every tick.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from serving.keys import Keys
from serving.metrics import AUTOSCALE_DESIRED_REPLICAS, MetricBatch
from serving.queue import JobQueue, QueueStats
from serving.settings import Settings, load_settings

log = structlog.get_logger(__name__)

POLICY_PATH = "serving.autoscaling:QueueDepthPolicy"
# The controller calls the policy every ~0.1 s; the queue does not change meaningfully faster.
STATS_REFRESH_S = 2.0



@dataclass(frozen=True)
class ScalingParams:
    """How fast one replica works and how long a job may wait."""

    jobs_per_replica_per_min: float
    target_wait_s: float
    min_replicas: int
    max_replicas: int

    @property
    def jobs_per_replica_per_target_wait(self) -> float:
        return self.jobs_per_replica_per_min * self.target_wait_s / 60.0


@dataclass(frozen=True)
class ScalingDecision:
    replicas: int
    reason: str  # "depth", "age", "idle", "bounds"


def desired_replicas(depth: int, oldest_wait_s: float, current: int, params: ScalingParams) -> ScalingDecision:
    """Replicas for `depth` jobs (waiting + active) whose oldest has waited `oldest_wait_s`."""
    if depth <= 0:
        return ScalingDecision(params.min_replicas, "idle")
    per_replica = max(params.jobs_per_replica_per_target_wait, 1e-9)
    wanted, reason = max(1, math.ceil(depth / per_replica)), "depth"
    if oldest_wait_s > params.target_wait_s and wanted <= current:
        # Jobs already wait longer than we promise: the estimate of throughput was too kind.
        wanted, reason = current + 1, "age"
    bounded = min(params.max_replicas, max(params.min_replicas, wanted))
    return ScalingDecision(bounded, reason if bounded == wanted else "bounds")


class QueueDepthPolicy:
    """Ray Serve custom autoscaling policy (class form: one instance per deployment, reused)."""

    def __init__(
        self,
        queue_name: str,
        key_prefix: str,
        jobs_per_replica_per_min: float,
        target_wait_s: float,
        window_s: float = 300.0,
        redis_url: str | None = None,
    ) -> None:
        # Not a policy kwarg in production: Serve logs the kwargs, and the URL may hold a password.
        # The controller process has the same settings (environment, secrets dir) as the worker.
        self._redis_url = redis_url or load_settings().redis_url or ""
        self._queue_name = queue_name
        self._keys = Keys(key_prefix)
        self._jobs_per_replica_per_min = jobs_per_replica_per_min
        self._target_wait_s = target_wait_s
        self._window_s = window_s
        self._stats: QueueStats | None = None
        self._read_at = 0.0
        self._last: ScalingDecision | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx` is Ray Serve's AutoscalingContext; returns (replicas, policy state)."""
        stats = self._queue_stats()
        if stats is None:
            return ctx.target_num_replicas, ctx.policy_state  # Redis unreachable: hold steady
        params = ScalingParams(
            self._jobs_per_replica_per_min,
            self._target_wait_s,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
        decision = desired_replicas(stats.waiting + stats.active, stats.oldest_waiting_age_s,
                                    ctx.current_num_replicas, params)
        if decision != self._last:
            self._last = decision
            log.info("autoscaling_decision", deployment=ctx.deployment_name, replicas=decision.replicas,
                     reason=decision.reason, current=ctx.current_num_replicas, waiting=stats.waiting,
                     active=stats.active, oldest_wait_s=round(stats.oldest_waiting_age_s, 1))
            self._export(ctx.deployment_name, decision)
        return decision.replicas, ctx.policy_state

    def _queue_stats(self) -> QueueStats | None:
        now = time.monotonic()
        if self._stats is None or now - self._read_at >= STATS_REFRESH_S:
            try:
                # The controller calls policies synchronously, outside any event loop of ours.
                self._stats = asyncio.run(self._read_stats())
            except (redis.RedisError, OSError) as exc:
                log.warning("autoscaling_queue_unreadable", error=repr(exc))
                return self._stats
            self._read_at = now
        return self._stats

    async def _read_stats(self) -> QueueStats:
        queue = JobQueue(self._redis_url, self._queue_name)
        try:
            return await queue.stats(self._window_s)
        finally:
            await queue.close()

    def _export(self, deployment: str, decision: ScalingDecision) -> None:
        batch = MetricBatch(self._keys)
        batch.set(AUTOSCALE_DESIRED_REPLICAS, {"deployment": deployment}, decision.replicas)
        client = redis.Redis.from_url(self._redis_url)
        try:
            batch.flush(client)
        finally:
            client.close()


def generator_autoscaling_config(settings: Settings) -> dict[str, Any]:
    """The Generator's Ray Serve `autoscaling_config`, with this policy."""
    return {
        "min_replicas": settings.autoscale_min_replicas,
        "max_replicas": max(settings.autoscale_max_replicas, settings.autoscale_min_replicas, 1),
        "initial_replicas": max(settings.autoscale_min_replicas, 1),
        "upscale_delay_s": settings.autoscale_upscale_delay_s,
        "downscale_delay_s": settings.autoscale_downscale_delay_s,
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {
                "queue_name": settings.queue_name,
                "key_prefix": settings.key_prefix,
                "jobs_per_replica_per_min": settings.autoscale_jobs_per_replica_per_min,
                "target_wait_s": settings.autoscale_target_wait_s,
                "window_s": float(settings.drain_rate_window_s),
            },
        },
    }


def generator_scaling_options(settings: Settings) -> dict[str, Any]:
    """`Generator.options(...)` for scaling: the queue-depth policy when the bounds leave it room
    (max above min, or scale to zero); otherwise nothing, one fixed replica as before."""
    if settings.autoscale_max_replicas <= max(settings.autoscale_min_replicas, 1) and settings.autoscale_min_replicas:
        return {}
    return {"autoscaling_config": generator_autoscaling_config(settings)}
