"""The queue-depth autoscaling policy, called the way Ray Serve's controller calls it.

The controller keeps one `DeploymentAutoscalingState` per deployment: `register` instantiates the
policy class from the deployment's `autoscaling_config` (wrapped with Serve's bounds and delays),
replicas' metric reports land in `record_request_metrics_for_replica`, and every control tick
calls `get_decision_num_replicas` synchronously from inside the controller's running event loop.
These tests drive that same object the same way, on a running loop, so a policy that blocks or
starts a loop of its own fails here (the multi-node test in tests/scaling runs the real controller).
"""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest
from pydantic.warnings import PydanticDeprecatedSince20

# Ray Serve 2.60's own models use a pydantic-1 Field idiom; that warning is Ray's, not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PydanticDeprecatedSince20)
    from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
    from ray.serve._private.common import DeploymentID, ReplicaID, ReplicaMetricReport, TimeStampedValue
    from ray.serve._private.config import DeploymentConfig, ReplicaConfig
    from ray.serve._private.deployment_info import DeploymentInfo
    from ray.serve.config import AutoscalingConfig

from serving.autoscaling import (
    POLICY_PATH,
    QUEUE_ACTIVE,
    QUEUE_OLDEST_WAIT_S,
    QUEUE_WAITING,
    QueueDepthPolicy,
    QueueProbe,
    ScalingParams,
    desired_replicas,
    generator_autoscaling_config,
    generator_scaling_options,
)
from serving.queue import JobQueue
from serving.settings import Settings
from serving.types import Priority, QueuedJob

# One replica does 2 jobs a minute and a job may wait a minute: 2 jobs per replica.
PARAMS = ScalingParams(jobs_per_replica_per_min=2.0, target_wait_s=60.0)
GENERATOR = DeploymentID(name="Generator", app_name="svd-serve")


@pytest.mark.parametrize(
    ("depth", "oldest", "current", "replicas", "reason"),
    [
        (0, 0.0, 3, 0, "idle"),  # nothing to do: Serve bounds this by min_replicas (0 scales to zero)
        (1, 0.0, 0, 1, "depth"),  # anything waiting wants one replica
        (4, 10.0, 1, 2, "depth"),
        (5, 10.0, 1, 3, "depth"),  # ceil(5 / 2)
        (4, 90.0, 2, 3, "age"),  # waited past the target although depth says 2: one more
        (6, 90.0, 2, 3, "depth"),  # depth already asks for more than now
        (100, 0.0, 2, 50, "depth"),  # unbounded: Serve applies max_replicas, Ray exports the raw wish
    ],
)
def test_desired_replicas(depth: int, oldest: float, current: int, replicas: int, reason: str) -> None:
    decision = desired_replicas(depth, oldest, current, PARAMS)
    assert (decision.replicas, decision.reason) == (replicas, reason)


class _Controller:
    """Serve's per-deployment autoscaling state, registered from our config as the controller does."""

    def __init__(self, settings: Settings, running: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PydanticDeprecatedSince20)
            config = AutoscalingConfig(**generator_autoscaling_config(settings))
            info = DeploymentInfo(
                deployment_config=DeploymentConfig(autoscaling_config=config),
                replica_config=ReplicaConfig.create(_Controller),
                start_time_ms=0,
                deployer_job_id="",
            )
        self.state = DeploymentAutoscalingState(GENERATOR)
        self.target = self.state.register(info, 1)
        self.replicas = [ReplicaID(f"r{i}", deployment_id=GENERATOR) for i in range(running)]
        self.state.update_running_replica_ids(self.replicas)

    def report(self, waiting: float, active: float, oldest_s: float, at: float | None = None) -> None:
        """A `record_autoscaling_stats` sample of every replica, as their metrics pushes carry it."""
        at = time.time() if at is None else at
        for replica in self.replicas:
            series = {QUEUE_WAITING: waiting, QUEUE_ACTIVE: active, QUEUE_OLDEST_WAIT_S: oldest_s}
            self.state.record_request_metrics_for_replica(
                ReplicaMetricReport(
                    replica_id=replica,
                    metrics={name: [TimeStampedValue(at, value)] for name, value in series.items()},
                    timestamp=at,
                )
            )

    def tick(self) -> int:
        """One control-loop decision, synchronously (the caller is on a running event loop)."""
        asyncio.get_running_loop()  # the controller's situation: a loop is running
        self.target = self.state.get_decision_num_replicas(curr_target_num_replicas=self.target)
        return self.target


SCALING = {"autoscale_min_replicas": 0, "autoscale_max_replicas": 6, "autoscale_upscale_delay_s": 0,
           "autoscale_downscale_delay_s": 0, "autoscale_jobs_per_replica_per_min": 2.0,
           "autoscale_target_wait_s": 60.0}


async def test_policy_decides_inside_the_controllers_running_loop() -> None:
    controller = _Controller(Settings(**SCALING), running=1)
    controller.report(waiting=7, active=0, oldest_s=3.0)
    assert controller.tick() == 4  # ceil(7 / 2)
    controller.report(waiting=40, active=8, oldest_s=30.0)
    assert controller.tick() == 6  # 24 wanted, bounded by max_replicas by Serve
    controller.report(waiting=0, active=0, oldest_s=0.0)
    assert controller.tick() == 1  # Serve steps down to one first...
    assert controller.tick() == 0  # ...then to zero (idle, min_replicas 0)


async def test_policy_holds_steady_without_fresh_numbers() -> None:
    controller = _Controller(Settings(**SCALING), running=2)
    controller.target = 2
    assert controller.tick() == 2  # no report yet
    controller.report(waiting=9, active=0, oldest_s=1.0, at=time.time() - 3600)
    assert controller.tick() == 2  # an hour-old sample says nothing about now


async def test_upscale_delay_is_serves() -> None:
    controller = _Controller(Settings(**{**SCALING, "autoscale_upscale_delay_s": 3600}), running=1)
    controller.report(waiting=7, active=0, oldest_s=0.0)
    assert controller.tick() == 1  # Serve's delay logic wraps our decision


def test_policy_reads_the_freshest_replica() -> None:
    policy = QueueDepthPolicy(jobs_per_replica_per_min=2.0, target_wait_s=60.0)
    now = time.time()

    class Ctx:
        deployment_name = "Generator"
        current_num_replicas = 2
        target_num_replicas = 2
        current_time = now
        policy_state: dict[str, object] = {}
        raw_metrics = {
            QUEUE_WAITING: {"old": [TimeStampedValue(now - 20, 1.0)], "new": [TimeStampedValue(now - 1, 9.0)]},
            QUEUE_ACTIVE: {"old": [TimeStampedValue(now - 20, 0.0)], "new": [TimeStampedValue(now - 1, 1.0)]},
        }

    replicas, state = policy(Ctx())
    assert replicas == 5 and state["reason"] == "depth"  # ceil((9 + 1) / 2), from the newer replica


async def test_queue_probe_reads_the_queue(redis_url: str, unique_prefix: str) -> None:
    queue = JobQueue(redis_url, unique_prefix)
    probe = QueueProbe(redis_url, unique_prefix, window_s=300)
    try:
        for i in range(7):
            await queue.add(QueuedJob(job_id=f"j{i}", owner_id="o"), priority=Priority.NORMAL, attempts=1,
                            backoff_ms=10)
        stats = await probe.autoscaling_stats()
        assert stats[QUEUE_WAITING] == 7 and stats[QUEUE_ACTIVE] == 0
        assert stats[QUEUE_OLDEST_WAIT_S] >= 0
        # Serve validates the first answer: a dict of str -> int | float, or it stops asking.
        assert all(isinstance(v, (int, float)) for v in stats.values())
    finally:
        await probe.aclose()
        await queue.obliterate()
        await queue.close()


def test_autoscaling_config_is_accepted_by_ray_serve() -> None:
    settings = Settings(autoscale_min_replicas=0, autoscale_max_replicas=6, autoscale_target_wait_s=120,
                        redis_url="redis://:secret@example:6379/0")
    raw = generator_autoscaling_config(settings)
    assert "secret" not in repr(raw)  # Serve logs the policy kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PydanticDeprecatedSince20)
        config = AutoscalingConfig(**raw)
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (0, 6, 1)
    assert config.policy.policy_function == POLICY_PATH
    assert config.policy.policy_kwargs["target_wait_s"] == 120
    assert config.policy.get_policy() is QueueDepthPolicy


def test_generator_scaling_options() -> None:
    fixed = generator_scaling_options(Settings())
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed  # one replica on a laptop
    # Scale-down and rollouts stop a replica gracefully: long enough for a job to finish.
    assert fixed["graceful_shutdown_timeout_s"] > Settings().job_deadline_s
    wide = generator_scaling_options(Settings(autoscale_min_replicas=1, autoscale_max_replicas=4))
    assert wide["autoscaling_config"]["max_replicas"] == 4
    to_zero = generator_scaling_options(Settings(autoscale_min_replicas=0, autoscale_max_replicas=1))
    assert to_zero["autoscaling_config"]["min_replicas"] == 0
