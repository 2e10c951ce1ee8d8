"""The routing rules, the circuit breaker, and the runner routing jobs between two scripted
backends (STYLE 2: the fallback policy against fake backends) on a real job store and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRecord, JobRepository
from serving.db.migrate import upgrade
from serving.errors import PermanentError, ProviderUnavailable, RetryableError
from serving.keys import Keys
from serving.metrics import read_worker_metrics
from serving.observability.job_metrics import JobMetrics
from serving.providers.breaker import BreakerState, CircuitBreaker
from serving.providers.health import LocalHealth, PoolState, pool_state_of
from serving.providers.router import (
    ProviderRouter,
    RoutingDecision,
    RoutingPolicy,
    RoutingReason,
    RoutingSignals,
    decide,
)
from serving.queue import ConsumedJobInfo
from serving.settings import Settings
from serving.providers.routed import RoutedBackend
from serving.storage import LocalStorage
from serving.types import JobParams, JobStatus, QueuedJob, Rendered, RenderJob
from serving.worker.postprocessing import InProcessPostProcess, PostProcessingService
from serving.worker.runner import JobRunner

PARAMS = JobParams(
    model="tiny-random", width=64, height=64, num_frames=4, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=1, min_guidance_scale=1.0, max_guidance_scale=3.0,
)
KEYS = frozenset({"runway"})
ON = RoutingPolicy(configured=KEYS, fallback_enabled=True, unhealthy_threshold_s=60, sla_s=120)
TO_FAL = RoutingPolicy(frozenset({"runway", "fal"}), True, 60, 120, fallback_provider="fal")
R = RoutingReason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# The rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "signals", "policy", "expected"),
    [
        ("local", RoutingSignals(local_unhealthy_for_s=999, local_failed=True), ON, ("local", R.REQUESTED)),
        ("runway", RoutingSignals(), ON, ("runway", R.REQUESTED)),
        ("auto", RoutingSignals(), ON, ("local", R.DEFAULT)),
        ("auto", RoutingSignals(local_failed=True), ON, ("runway", R.LOCAL_FAILED)),
        ("auto", RoutingSignals(local_unhealthy_for_s=61), ON, ("runway", R.LOCAL_UNHEALTHY)),
        ("auto", RoutingSignals(local_unhealthy_for_s=59), ON, ("local", R.DEFAULT)),
        ("auto", RoutingSignals(estimated_wait_s=121), ON, ("runway", R.QUEUE_WAIT)),
        ("auto", RoutingSignals(estimated_wait_s=119), ON, ("local", R.DEFAULT)),
        ("auto", RoutingSignals(open_breakers=frozenset({"local"})), ON, ("runway", R.LOCAL_BREAKER_OPEN)),
        ("auto", RoutingSignals(local_failed=True, open_breakers=frozenset({"runway"})), ON,
         ("local", R.FALLBACK_BREAKER_OPEN)),
        # The fallback needs both the operator's switch and a key.
        ("auto", RoutingSignals(local_failed=True, local_unhealthy_for_s=999),
         RoutingPolicy(KEYS, False, 60, 120), ("local", R.DEFAULT)),
        ("auto", RoutingSignals(local_failed=True), RoutingPolicy(frozenset(), True, 60, 120), ("local", R.DEFAULT)),
        # No SLA configured: no queue-wait rule.
        ("auto", RoutingSignals(estimated_wait_s=10_000), RoutingPolicy(KEYS, True, 60, 0), ("local", R.DEFAULT)),
        # fal (alias pika): by name, and as the configured fallback.
        ("fal", RoutingSignals(), TO_FAL, ("fal", R.REQUESTED)),
        ("pika", RoutingSignals(), TO_FAL, ("fal", R.REQUESTED)),
        ("auto", RoutingSignals(local_failed=True), TO_FAL, ("fal", R.LOCAL_FAILED)),
        ("auto", RoutingSignals(local_failed=True), RoutingPolicy(KEYS, True, 60, 0, fallback_provider="fal"),
         ("local", R.DEFAULT)),  # fal is the fallback but has no key
    ],
)
def test_routing_rules(requested: str, signals: RoutingSignals, policy: RoutingPolicy, expected: tuple[str, R]) -> None:
    assert decide(requested, signals, policy) == RoutingDecision(*expected)


@pytest.mark.parametrize("provider", ["runway", "fal", "pika"])
def test_managed_provider_requested_without_key_or_with_open_breaker(provider: str) -> None:
    with pytest.raises(PermanentError) as missing:
        decide(provider, RoutingSignals(), RoutingPolicy(frozenset(), True, 60, 0))
    assert missing.value.code == "provider_not_configured"
    with pytest.raises(ProviderUnavailable):
        decide(provider, RoutingSignals(open_breakers=frozenset({"runway", "fal"})), TO_FAL)
    with pytest.raises(PermanentError) as unknown:
        decide("sora", RoutingSignals(), TO_FAL)
    assert unknown.value.code == "unknown_provider"


# The breaker -----------------------------------------------------------------------------------


def test_breaker_opens_probes_half_open_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker("runway-test", failure_threshold=3, reset_s=30, clock=clock)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow() and not breaker.available()

    clock.now += 30
    assert breaker.state is BreakerState.HALF_OPEN and breaker.available()
    assert breaker.allow() is True  # the one probe
    assert breaker.allow() is False and not breaker.available()  # nothing else while it is out
    breaker.record_failure()  # the probe failed: open again, for another reset period
    assert breaker.state is BreakerState.OPEN
    clock.now += 29
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()
    breaker.record_success()  # the probe succeeded: closed
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


async def test_local_health_counts_time_without_a_healthy_replica() -> None:
    clock = Clock()
    answers = [True, False, False, True]

    async def probe() -> bool:
        return answers.pop(0)

    health = LocalHealth(probe, min_interval_s=5, clock=clock)
    await health.refresh()
    assert health.unhealthy_for_s() == 0
    clock.now += 5
    await health.refresh()
    clock.now += 70
    await health.refresh()
    assert health.unhealthy_for_s() == 70  # unhealthy since the first failed probe
    clock.now += 1
    await health.refresh()  # within min_interval_s of the last probe: not asked again
    assert answers == [True] and health.unhealthy_for_s() == 71
    clock.now += 5
    await health.refresh()
    assert health.unhealthy_for_s() == 0


async def test_a_cold_start_is_not_an_unhealthy_pool_until_its_allowance() -> None:
    """Scaled to zero (idle) and on its way up (starting) are not "down": a new spot node needs
    minutes for boot, image and weights, and a job sent to it runs as soon as it is ready."""
    clock = Clock()
    states = [PoolState.IDLE, PoolState.STARTING, PoolState.STARTING, PoolState.STARTING, PoolState.READY,
              PoolState.DOWN, PoolState.DOWN]

    async def probe() -> PoolState:
        return states.pop(0)

    health = LocalHealth(probe, min_interval_s=0, cold_start_allowance_s=600, clock=clock)
    await health.refresh()
    assert health.unhealthy_for_s() == 0  # scaled to zero: the job itself brings a replica up
    clock.now += 10
    await health.refresh()  # the cold start begins
    clock.now += 590
    await health.refresh()
    assert health.unhealthy_for_s() == 0  # 590 s into a 600 s allowance
    clock.now += 70
    await health.refresh()
    assert health.unhealthy_for_s() == 60  # past the allowance, it counts
    clock.now += 5
    await health.refresh()
    assert health.unhealthy_for_s() == 0  # ready
    clock.now += 5
    await health.refresh()
    clock.now += 61
    await health.refresh()
    assert health.unhealthy_for_s() == 61  # down counts from the start, no allowance


@pytest.mark.parametrize(
    ("status", "replicas", "state"),
    [
        ("HEALTHY", {"RUNNING": 2}, PoolState.READY),
        ("UPSCALING", {"RUNNING": 1, "STARTING": 2}, PoolState.READY),
        ("HEALTHY", {}, PoolState.IDLE),  # scaled to zero
        ("DeploymentStatus.UPSCALING", {"ReplicaState.STARTING": 1}, PoolState.STARTING),  # cold start
        ("UPSCALING", {}, PoolState.STARTING),  # wanted, not placed yet (no GPU node)
        ("UNHEALTHY", {"STARTING": 1}, PoolState.DOWN),
        ("DEPLOY_FAILED", {}, PoolState.DOWN),
    ],
)
def test_pool_state_from_serve_status(status: str, replicas: dict[str, int], state: PoolState) -> None:
    assert pool_state_of(status, replicas) is state


# The runner with a router ----------------------------------------------------------------------


@dataclass
class Scripted:
    """A provider that fails `failures` times, then makes a 4-frame clip; counts its calls."""

    name: str
    failures: int = 0
    credits: float | None = None
    calls: list[str] = field(default_factory=list)

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        self.calls.append(job.job_id)
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError(f"{self.name} is down")
        frames = np.full((4, 64, 64, 3), 120, dtype=np.uint8)
        if self.credits is not None:
            return Rendered(frames, gpu_seconds=0.0, device=self.name, credits=self.credits)
        return Rendered(frames, gpu_seconds=36.0, device="cpu")

    async def health(self) -> bool:
        return True

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return CostEstimate(self.name, 0.0)


@dataclass
class Outcomes:
    """A sink that keeps every terminal status the runner announces, per job."""

    seen: dict[str, list[str]] = field(default_factory=dict)

    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None:
        if record.status.terminal:
            self.seen.setdefault(record.id, []).append(record.status.value)

    async def job_progress(self, job_id: str, **_: object) -> None:
        pass


@dataclass
class Env:
    jobs: JobRepository
    redis: aioredis.Redis
    keys: Keys
    settings: Settings
    storage: LocalStorage
    outcomes: Outcomes = field(default_factory=Outcomes)

    async def new_job(self, provider: str = "auto") -> str:
        job_id = str(uuid.uuid4())
        await self.jobs.create(
            job_id=job_id, owner_id="o1", image_url=f"local://o1/{job_id}/input.png", params=PARAMS.to_json(),
            model="tiny-random", priority="normal", requested_provider=provider,
        )
        return job_id

    def runner(self, router: ProviderRouter, local: Scripted | None = None) -> JobRunner:
        """The runner as the Dispatcher builds it: one routed backend over the router's
        providers, the post-processing stage after it (in-process here)."""
        prices = Prices.from_settings(self.settings)
        metrics = JobMetrics(self.redis, self.keys, self.settings.gpu_hour_price_usd)
        post = InProcessPostProcess(PostProcessingService(self.settings, self.storage))
        routed = RoutedBackend(router, post, self.jobs, prices=prices, metrics=metrics)
        return JobRunner(self.jobs, routed, self.redis, self.keys, self.outcomes, metrics=metrics, prices=prices)


@pytest.fixture
async def env(tmp_path: Path, redis_url: str, unique_prefix: str) -> AsyncIterator[Env]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    client = aioredis.Redis.from_url(redis_url)
    settings = Settings(
        data_dir=tmp_path, runway_api_key=SecretStr("key"), fallback_enabled=True, routing_sla_s=100,
        breaker_failure_threshold=2, breaker_reset_s=3600, gpu_hour_price_usd=2.0,
    )
    try:
        storage = LocalStorage(settings.resolved_storage_dir, "http://127.0.0.1:8000", "s")
        yield Env(JobRepository(make_session_factory(engine)), client, Keys(unique_prefix), settings, storage)
    finally:
        await client.aclose()
        await engine.dispose()


def info(attempt: int, max_attempts: int = 3) -> ConsumedJobInfo:
    return ConsumedJobInfo(attempt=attempt, max_attempts=max_attempts)


async def routed(env: Env, provider: str, reason: str) -> float:
    """The routing counter as the exporter reads it from Redis (serving.metrics)."""
    families = await read_worker_metrics(env.redis, env.keys)
    family = next(f for f in families if f.name == "svd_provider_routing_decisions")
    return sum(s.value for s in family.samples
               if s.name.endswith("_total") and s.labels == {"provider": provider, "reason": reason})


async def test_auto_stays_local_and_records_gpu_cost(env: Env) -> None:
    local, runway = Scripted("local"), Scripted("runway", credits=25)
    router = ProviderRouter.from_settings(env.settings, {"local": local, "runway": runway})
    before = await routed(env, "local", "default")
    job_id = await env.new_job()
    await env.runner(router, local).handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED
    assert (job.provider, job.routing_reason) == ("local", "default") and runway.calls == []
    assert job.cost_usd == pytest.approx(0.02) and job.provider_credits is None  # 36 s at $2/h
    assert await routed(env, "local", "default") == before + 1


async def test_local_failure_on_last_attempt_falls_back_to_runway(env: Env) -> None:
    local, runway = Scripted("local", failures=3), Scripted("runway", credits=50)
    router = ProviderRouter.from_settings(env.settings, {"local": local, "runway": runway})
    job_id = await env.new_job()
    with pytest.raises(RetryableError):
        await env.runner(router, local).handle(QueuedJob(job_id, "o1"), info(1, max_attempts=2))
    assert runway.calls == []  # not the last attempt: the queue retries locally first
    await env.runner(router, local).handle(QueuedJob(job_id, "o1"), info(2, max_attempts=2))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED
    assert (job.provider, job.routing_reason) == ("runway", "local_failed") and runway.calls == [job_id]
    assert job.provider_credits == 50 and job.cost_usd == pytest.approx(0.5)
    # Exactly one outcome: one terminal status announced, one set of outputs stored.
    assert env.outcomes.seen == {job_id: ["completed"]}
    assert sorted(p.name for p in env.storage.path(f"o1/{job_id}").iterdir()) == ["thumbnail.jpg", "video.mp4"]
    assert await routed(env, "runway", "local_failed") >= 1


async def test_local_job_is_not_sent_to_runway_even_when_failing(env: Env) -> None:
    local, runway = Scripted("local", failures=1), Scripted("runway", credits=50)
    router = ProviderRouter.from_settings(env.settings, {"local": local, "runway": runway})
    job_id = await env.new_job("local")
    with pytest.raises(PermanentError):
        await env.runner(router, local).handle(QueuedJob(job_id, "o1"), info(1, max_attempts=1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.ERROR and runway.calls == []
    assert (job.provider, job.routing_reason) == ("local", "requested")


async def test_unhealthy_local_pool_and_long_queue_route_to_runway(env: Env) -> None:
    clock = Clock()
    healthy = [False]

    async def probe() -> bool:
        return healthy[0]

    async def wait_s() -> float:
        return waits[0]

    waits = [0.0]
    local, runway = Scripted("local"), Scripted("runway", credits=25)
    health = LocalHealth(probe, min_interval_s=0, clock=clock)
    router = ProviderRouter.from_settings(
        env.settings, {"local": local, "runway": runway}, health=health, estimate_wait_s=wait_s
    )
    first = await env.new_job()
    await env.runner(router, local).handle(QueuedJob(first, "o1"), info(1))  # unhealthy, but not for long
    clock.now += env.settings.local_unhealthy_threshold_s + 1
    second = await env.new_job()
    await env.runner(router, local).handle(QueuedJob(second, "o1"), info(1))
    healthy[0] = True
    waits[0] = 101.0  # above the 100 s SLA
    third = await env.new_job()
    await env.runner(router, local).handle(QueuedJob(third, "o1"), info(1))
    reasons = [(j.provider, j.routing_reason) for j in [await env.jobs.get(i) for i in (first, second, third)] if j]
    assert reasons == [("local", "default"), ("runway", "local_unhealthy"), ("runway", "queue_wait")]


async def test_breaker_stops_runway_then_a_probe_closes_it(env: Env) -> None:
    clock = Clock()
    local, runway = Scripted("local"), Scripted("runway", failures=2, credits=25)
    breakers = {
        name: CircuitBreaker(name, failure_threshold=2, reset_s=60, clock=clock) for name in ("local", "runway")
    }
    router = ProviderRouter(
        RoutingPolicy.from_settings(env.settings), {"local": local, "runway": runway}, breakers
    )
    for _ in range(2):
        job_id = await env.new_job("runway")
        with pytest.raises(RetryableError):
            await env.runner(router, local).handle(QueuedJob(job_id, "o1"), info(1))
    assert breakers["runway"].state is BreakerState.OPEN and len(runway.calls) == 2
    # Open: Runway gets nothing; an explicit runway job waits (retryable), auto stays local.
    blocked = await env.new_job("runway")
    with pytest.raises(RetryableError, match="circuit breaker is open"):
        await env.runner(router, local).handle(QueuedJob(blocked, "o1"), info(1))
    auto = await env.new_job()
    await env.runner(router, local).handle(QueuedJob(auto, "o1"), info(1))
    assert len(runway.calls) == 2
    job = await env.jobs.get(blocked)
    assert job is not None and job.status is JobStatus.QUEUED and job.error_code == "attempt_failed"
    # After the reset period one probe goes through; it succeeds and the breaker closes.
    clock.now += 60
    await env.runner(router, local).handle(QueuedJob(blocked, "o1"), info(2))
    job = await env.jobs.get(blocked)
    assert job is not None and job.status is JobStatus.COMPLETED and job.provider == "runway"
    assert breakers["runway"].state is BreakerState.CLOSED


async def test_dispatcher_builds_runway_only_with_a_key(env: Env, redis_url: str, unique_prefix: str) -> None:
    from serving.providers.setup import build_providers

    class Local(Scripted):
        async def health(self) -> bool:
            return True

        async def pool_state(self) -> PoolState:
            return PoolState.READY

        def estimate_cost(self, params: JobParams) -> CostEstimate:
            return CostEstimate("local", 0.0)

    base = env.settings.model_copy(update={"redis_url": redis_url, "queue_name": unique_prefix})
    post = InProcessPostProcess(PostProcessingService(env.settings, env.storage))
    with_key = build_providers(base, Local("local"), post, env.jobs, env.redis, env.keys)
    without = build_providers(
        base.model_copy(update={"runway_api_key": SecretStr("")}), Local("local"), post, env.jobs, env.redis, env.keys
    )
    try:
        assert with_key.runway is not None and with_key.router.backend("runway") is with_key.runway
        assert without.runway is None and not without.router.policy.fallback_allowed
        with pytest.raises(PermanentError):
            without.router.backend("runway")
        assert (await with_key.router.signals()).estimated_wait_s == 0.0  # an empty queue
    finally:
        await with_key.aclose()
        await without.aclose()
