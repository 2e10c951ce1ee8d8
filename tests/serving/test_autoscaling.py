"""The queue-depth autoscaling policy: a pure function of the queue's numbers, the Ray Serve
callable on a real Redis queue, and the `autoscaling_config` Ray Serve 2.60 accepts."""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic.warnings import PydanticDeprecatedSince20

# Ray Serve 2.60's own models use a pydantic-1 Field idiom; that warning is Ray's, not ours.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PydanticDeprecatedSince20)
    from ray.serve.config import AutoscalingConfig

from serving.autoscaling import (
    POLICY_PATH,
    QueueDepthPolicy,
    ScalingParams,
    desired_replicas,
    generator_autoscaling_config,
    generator_scaling_options,
)
from serving.queue import JobQueue
from serving.settings import Settings
from serving.types import Priority, QueuedJob

# One replica does 2 jobs a minute and a job may wait a minute: 2 jobs per replica.
PARAMS = ScalingParams(jobs_per_replica_per_min=2.0, target_wait_s=60.0, min_replicas=0, max_replicas=8)


@pytest.mark.parametrize(
    ("depth", "oldest", "current", "replicas", "reason"),
    [
        (0, 0.0, 3, 0, "idle"),  # scale to zero when idle (min_replicas 0)
        (1, 0.0, 0, 1, "depth"),  # anything waiting wakes one replica
        (4, 10.0, 1, 2, "depth"),
        (5, 10.0, 1, 3, "depth"),  # ceil(5 / 2)
        (4, 90.0, 2, 3, "age"),  # waited past the target although depth says 2: one more
        (6, 90.0, 2, 3, "depth"),  # depth already asks for more than now
        (100, 0.0, 2, 8, "bounds"),  # capped at max
    ],
)
def test_desired_replicas(depth: int, oldest: float, current: int, replicas: int, reason: str) -> None:
    decision = desired_replicas(depth, oldest, current, PARAMS)
    assert (decision.replicas, decision.reason) == (replicas, reason)


def test_min_replicas_keeps_a_warm_replica() -> None:
    params = ScalingParams(2.0, 60.0, min_replicas=1, max_replicas=4)
    assert desired_replicas(0, 0.0, 3, params).replicas == 1


@dataclass
class Context:
    """The fields of Ray Serve's AutoscalingContext that the policy reads."""

    deployment_name: str = "Generator"
    current_num_replicas: int = 1
    target_num_replicas: int = 1
    capacity_adjusted_min_replicas: int = 0
    capacity_adjusted_max_replicas: int = 10
    policy_state: dict[str, Any] = field(default_factory=dict)


async def test_policy_reads_the_queue(redis_url: str, unique_prefix: str) -> None:
    queue = JobQueue(redis_url, unique_prefix)
    try:
        for i in range(7):
            await queue.add(QueuedJob(job_id=f"j{i}", owner_id="o"), priority=Priority.NORMAL, attempts=1,
                            backoff_ms=10)
        policy = QueueDepthPolicy(unique_prefix, unique_prefix, jobs_per_replica_per_min=2.0,
                                  target_wait_s=60.0, redis_url=redis_url)
        # The controller calls policies from a thread of its own, outside any running loop.
        replicas, state = await asyncio.to_thread(policy, Context(policy_state={"k": 1}))
        assert replicas == 4 and state == {"k": 1}  # ceil(7 / 2)
        # The decision is exported for /metrics (a gauge in Redis, see serving.metrics).
        client = aioredis.Redis.from_url(redis_url)
        try:
            gauge = await client.hgetall(f"{unique_prefix}:metrics:svd_autoscaling_desired_replicas")
        finally:
            await client.aclose()
        assert [float(v) for v in gauge.values()] == [4.0]
    finally:
        await queue.obliterate()
        await queue.close()


def test_autoscaling_config_is_accepted_by_ray_serve() -> None:
    settings = Settings(autoscale_min_replicas=0, autoscale_max_replicas=6, autoscale_target_wait_s=120,
                        redis_url="redis://:secret@example:6379/0")
    raw = generator_autoscaling_config(settings)
    assert "secret" not in repr(raw)  # Serve logs the policy kwargs
    config = AutoscalingConfig(**raw)
    assert (config.min_replicas, config.max_replicas, config.initial_replicas) == (0, 6, 1)
    assert config.policy.policy_function == POLICY_PATH
    assert config.policy.policy_kwargs["target_wait_s"] == 120
    # Ray Serve deserializes and instantiates the class with the kwargs, as its controller does.
    policy_class = config.policy.get_policy()
    assert policy_class is QueueDepthPolicy


def test_generator_scaling_options() -> None:
    assert generator_scaling_options(Settings()) == {}  # one fixed replica by default
    wide = generator_scaling_options(Settings(autoscale_min_replicas=1, autoscale_max_replicas=4))
    assert wide["autoscaling_config"]["max_replicas"] == 4
    to_zero = generator_scaling_options(Settings(autoscale_min_replicas=0, autoscale_max_replicas=1))
    assert to_zero["autoscaling_config"]["min_replicas"] == 0
