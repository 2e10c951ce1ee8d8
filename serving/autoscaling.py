"""Generator autoscaling sized to the job queue: a Ray Serve custom autoscaling policy.

Ray Serve's own policy scales on requests in flight at the handles, which for us is at most
`dispatcher_concurrency`: it cannot see the jobs waiting in Redis. This policy sizes the pool on
the queue instead (waiting + active jobs, and how long the oldest has waited):

    replicas = ceil(depth / (jobs per replica per minute * target wait in minutes))

at least one more than now when the oldest job has already waited longer than the target, at
least one whenever anything waits, zero when idle. Serve bounds the answer by
`min_replicas`/`max_replicas` and applies `upscale_delay_s`/`downscale_delay_s`; when the new
replicas do not fit, the Ray autoscaler (KubeRay) adds GPU nodes for them (k8s/README.md).

How the numbers reach the policy, the way Ray Serve 2.60 runs it:
- Each Generator replica defines `record_autoscaling_stats()` (replica-recorded custom metrics);
  Serve calls it on the replica's own event loop every `metrics_interval_s` and ships the result
  to the controller with the replica's autoscaling metrics. `QueueProbe` reads the queue there.
- The controller calls the policy synchronously, from inside its own asyncio event loop, on every
  control tick (about 0.1 s), with an `AutoscalingContext` whose `raw_metrics` hold those samples.
  So the policy is a cheap pure function of numbers: it takes the freshest sample and decides. It
  never does I/O, never blocks and never starts a loop (an `asyncio.run()` here raised on every
  tick and kept the app DEPLOYING).
- With no Generator replica nobody reports: Serve's own cold-start path brings the first replica
  up as soon as the Dispatcher's handle holds a request for it (a job arrived); from then on the
  replica reports the queue and the policy sizes the pool.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

from serving.queue import JobQueue
from serving.settings import Settings

# The controller's own logger: policy decisions land in the Serve controller's log.
log = logging.getLogger("ray.serve")

POLICY_PATH = "serving.autoscaling:QueueDepthPolicy"
# The custom metrics a Generator replica records (`record_autoscaling_stats`), by name.
QUEUE_WAITING = "svd_queue_waiting"
QUEUE_ACTIVE = "svd_queue_active"
QUEUE_OLDEST_WAIT_S = "svd_queue_oldest_wait_s"
# A replica is stopped gracefully by scale-down or a rollout: let a running job finish first.
GRACE_MARGIN_S = 60.0


@dataclass(frozen=True)
class ScalingParams:
    """How fast one replica works and how long a job may wait."""

    jobs_per_replica_per_min: float
    target_wait_s: float

    @property
    def jobs_per_replica_per_target_wait(self) -> float:
        return self.jobs_per_replica_per_min * self.target_wait_s / 60.0


@dataclass(frozen=True)
class ScalingDecision:
    replicas: int  # before Serve's min/max bounds (Ray exports it as serve_autoscaling_desired_replicas)
    reason: str  # "depth", "age", "idle", "no_data"


@dataclass(frozen=True)
class QueueSnapshot:
    """The queue as a replica last saw it."""

    waiting: float
    active: float
    oldest_wait_s: float
    observed_at: float  # epoch seconds (Serve timestamps metrics with time.time())

    @property
    def depth(self) -> int:
        return math.ceil(self.waiting + self.active)


def desired_replicas(depth: int, oldest_wait_s: float, current: int, params: ScalingParams) -> ScalingDecision:
    """Replicas for `depth` jobs (waiting + active) whose oldest has waited `oldest_wait_s`."""
    if depth <= 0:
        return ScalingDecision(0, "idle")
    per_replica = max(params.jobs_per_replica_per_target_wait, 1e-9)
    wanted = max(1, math.ceil(depth / per_replica))
    if oldest_wait_s > params.target_wait_s and wanted <= current:
        # Jobs already wait longer than we promise: the estimate of throughput was too kind.
        return ScalingDecision(current + 1, "age")
    return ScalingDecision(wanted, "depth")


class _Sample(Protocol):
    timestamp: float
    value: float


def latest_snapshot(raw_metrics: dict[str, dict[Any, list[_Sample]]] | None) -> QueueSnapshot | None:
    """The freshest queue sample any replica reported (every replica reads the same queue)."""
    if not raw_metrics:
        return None
    latest: dict[str, _Sample] = {}
    for name in (QUEUE_WAITING, QUEUE_ACTIVE, QUEUE_OLDEST_WAIT_S):
        for series in (raw_metrics.get(name) or {}).values():
            if series and (name not in latest or series[-1].timestamp > latest[name].timestamp):
                latest[name] = series[-1]
    if QUEUE_WAITING not in latest or QUEUE_ACTIVE not in latest:
        return None
    oldest = latest.get(QUEUE_OLDEST_WAIT_S)
    return QueueSnapshot(
        waiting=latest[QUEUE_WAITING].value,
        active=latest[QUEUE_ACTIVE].value,
        oldest_wait_s=oldest.value if oldest is not None else 0.0,
        observed_at=min(latest[QUEUE_WAITING].timestamp, latest[QUEUE_ACTIVE].timestamp),
    )


class QueueDepthPolicy:
    """Ray Serve custom autoscaling policy (class form: the controller instantiates it once with
    `policy_kwargs` and calls it every control tick, synchronously, on its event loop)."""

    def __init__(self, jobs_per_replica_per_min: float, target_wait_s: float, stale_after_s: float = 60.0) -> None:
        self._params = ScalingParams(jobs_per_replica_per_min, target_wait_s)
        self._stale_after_s = stale_after_s
        self._last: ScalingDecision | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx` is Ray Serve's AutoscalingContext; returns (replicas, policy state)."""
        snapshot = latest_snapshot(ctx.raw_metrics)
        now = ctx.current_time if ctx.current_time is not None else time.time()
        if snapshot is None or now - snapshot.observed_at > self._stale_after_s:
            # Nobody reported lately (no replica yet, or Redis unreadable): hold steady.
            decision = ScalingDecision(ctx.target_num_replicas, "no_data")
            depth, oldest = None, None
        else:
            decision = desired_replicas(snapshot.depth, snapshot.oldest_wait_s, ctx.current_num_replicas, self._params)
            depth, oldest = snapshot.depth, round(snapshot.oldest_wait_s, 1)
        if decision != self._last:
            self._last = decision
            log.info(
                "autoscaling_decision deployment=%s replicas=%d reason=%s current=%d depth=%s oldest_wait_s=%s",
                ctx.deployment_name, decision.replicas, decision.reason, ctx.current_num_replicas, depth, oldest,
            )
        return decision.replicas, {**ctx.policy_state, "reason": decision.reason}


class QueueProbe:
    """The replica side: the queue numbers the policy needs, read asynchronously on the
    replica's own event loop (`record_autoscaling_stats`), never on the controller's."""

    def __init__(self, redis_url: str, queue_name: str, window_s: float) -> None:
        self._queue = JobQueue(redis_url, queue_name)
        self._window_s = window_s

    async def autoscaling_stats(self) -> dict[str, float]:
        stats = await self._queue.stats(self._window_s)
        return {
            # Jobs waiting out a retry backoff come back within seconds: count them as waiting.
            QUEUE_WAITING: float(stats.waiting + stats.delayed),
            QUEUE_ACTIVE: float(stats.active),
            QUEUE_OLDEST_WAIT_S: float(stats.oldest_waiting_age_s),
        }

    async def aclose(self) -> None:
        await self._queue.close()


def generator_autoscaling_config(settings: Settings) -> dict[str, Any]:
    """The Generator's Ray Serve `autoscaling_config`, with this policy."""
    interval = settings.autoscale_metrics_interval_s
    return {
        "min_replicas": settings.autoscale_min_replicas,
        "max_replicas": max(settings.autoscale_max_replicas, settings.autoscale_min_replicas, 1),
        "initial_replicas": max(settings.autoscale_min_replicas, 1),
        "upscale_delay_s": settings.autoscale_upscale_delay_s,
        "downscale_delay_s": settings.autoscale_downscale_delay_s,
        "metrics_interval_s": interval,
        # Handle metrics (Serve's cold-start path) are averaged over this window.
        "look_back_period_s": max(2 * interval, 1.0),
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {
                "jobs_per_replica_per_min": settings.autoscale_jobs_per_replica_per_min,
                "target_wait_s": settings.autoscale_target_wait_s,
                # Several missed reports in a row: the replicas cannot read Redis; hold steady.
                "stale_after_s": max(5 * interval, 30.0),
            },
        },
    }


def scales(settings: Settings) -> bool:
    """Whether the bounds leave the policy any room (more than one replica, or scale to zero)."""
    return settings.autoscale_min_replicas == 0 or settings.autoscale_max_replicas > settings.autoscale_min_replicas


def generator_scaling_options(settings: Settings) -> dict[str, Any]:
    """`Generator.options(...)` for scaling and stopping: the queue-depth policy when the bounds
    leave it room (otherwise the fixed `autoscale_min_replicas`), and a graceful shutdown long
    enough for a running job to finish when scale-down or a rollout stops a replica (a node
    drain is handled by the replica itself: it hands back runs that would miss the deadline)."""
    options: dict[str, Any] = {"graceful_shutdown_timeout_s": settings.job_deadline_s + GRACE_MARGIN_S}
    if scales(settings):
        options["autoscaling_config"] = generator_autoscaling_config(settings)
    else:
        options["num_replicas"] = max(settings.autoscale_min_replicas, 1)
    return options
