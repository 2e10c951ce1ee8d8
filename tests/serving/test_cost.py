"""Cost per job and per owner, and budgets: prices, estimates, batch shares, monthly totals on a
real PostgreSQL and SQLite, the soft limit (log + metric) and the hard limit (402 at the ingress)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from serving.cost import (
    Budgets,
    CostLedger,
    Prices,
    estimate,
    parse_owner_budgets,
    runway_duration_s,
    share_batch,
)
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import upgrade
from serving.errors import BudgetExceeded
from serving.ingress.app import create_app
from serving.ingress.deps import Services
from serving.settings import Settings
from serving.types import JobParams, JobStatus

PARAMS = JobParams(
    model="tiny-random", width=64, height=64, num_frames=14, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=1, min_guidance_scale=1.0, max_guidance_scale=3.0,
)


def test_prices_and_estimates() -> None:
    on_demand = Prices.from_settings(Settings(gpu_hour_price_usd=3.6, gpu_hour_spot_price_usd=1.2))
    spot = Prices.from_settings(Settings(gpu_hour_price_usd=3.6, gpu_hour_spot_price_usd=1.2, gpu_pricing="spot"))
    assert on_demand.gpu_cost(100) == pytest.approx(0.1) and spot.gpu_cost(100) == pytest.approx(1 / 30, rel=1e-4)
    assert on_demand.credits_cost(25) == pytest.approx(0.25)
    assert estimate(PARAMS, "local", on_demand, 60).usd == pytest.approx(0.06)
    runway = estimate(PARAMS, "runway", on_demand, 60)
    assert runway.credits == 25 and runway.usd == pytest.approx(0.25)  # a 2 s clip bills Runway's 5 s minimum
    long_clip = JobParams(**{**PARAMS.to_json(), "num_frames": 25, "fps": 3, "outputs": ("mp4",)})
    assert runway_duration_s(long_clip) == 10


def test_batch_gpu_time_is_shared_by_work() -> None:
    assert share_batch(30.0, [14 * 25, 14 * 25, 28 * 25]) == pytest.approx([7.5, 7.5, 15.0])
    assert share_batch(9.0, [0, 0, 0]) == pytest.approx([3.0, 3.0, 3.0])
    assert share_batch(9.0, []) == []
    assert sum(share_batch(10.0, [1, 2, 3])) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        share_batch(1.0, [-1])


def test_owner_budgets_parse() -> None:
    assert parse_owner_budgets(" acme=100, beta=20.5 ") == {"acme": 100.0, "beta": 20.5}
    for bad in ("acme", "=5", "acme=lots"):
        with pytest.raises(ValueError):
            parse_owner_budgets(bad)


@pytest.fixture(params=["postgresql", "sqlite"])
async def jobs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobRepository]:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_database_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        yield JobRepository(make_session_factory(engine))
    finally:
        await engine.dispose()


async def finished_job(jobs: JobRepository, owner: str, cost: float, credits: float | None = None) -> str:
    job_id = str(uuid.uuid4())
    await jobs.create(
        job_id=job_id, owner_id=owner, image_url=f"local://{owner}/{job_id}/input.png", params=PARAMS.to_json(),
        model="tiny-random", priority="normal",
    )
    await jobs.transition(job_id, JobStatus.PROCESSING)
    await jobs.transition(job_id, JobStatus.COMPLETED, cost_usd=cost, provider_credits=credits)
    return job_id


async def test_monthly_totals_per_owner(jobs: JobRepository) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    job_id = await finished_job(jobs, alice, 0.25, credits=25)
    await finished_job(jobs, alice, 0.10)
    await finished_job(jobs, bob, 1.0)
    record = await jobs.get(job_id)
    assert record is not None and record.cost_usd == 0.25 and record.provider_credits == 25
    ledger = CostLedger(jobs._sessions)
    assert await ledger.month_total(alice) == pytest.approx(0.35)
    assert await ledger.month_total(bob) == pytest.approx(1.0)
    assert await ledger.month_total(f"nobody-{uuid.uuid4().hex[:8]}") == 0.0
    next_month = dt.datetime.now(dt.timezone.utc).replace(day=1) + dt.timedelta(days=32)
    assert await ledger.month_total(alice, now=next_month) == 0.0  # a new month starts from zero


async def test_budget_soft_limit_logs_and_counts_then_hard_limit_refuses(jobs: JobRepository) -> None:
    owner = f"carol-{uuid.uuid4().hex[:8]}"
    await finished_job(jobs, owner, 0.70)
    budgets = Budgets(Settings(budget_monthly_usd=100.0, owner_budgets_usd=f"{owner}=1.0"), CostLedger(jobs._sessions))
    assert budgets.budget_for(owner) == 1.0 and budgets.budget_for("someone-else") == 100.0
    assert (await budgets.check(owner, 0.05)).soft_limit_reached is False  # 0.75 < 80 %

    soft_before = REGISTRY.get_sample_value("svd_budget_soft_limit_total") or 0.0
    with capture_logs() as logs:
        check = await budgets.check(owner, 0.15)  # 0.85: past the soft share, within the budget
    assert check.soft_limit_reached and check.spent_usd == pytest.approx(0.70)
    assert any(e["event"] == "budget_soft_limit" and e["owner_id"] == owner for e in logs)
    assert REGISTRY.get_sample_value("svd_budget_soft_limit_total") == soft_before + 1

    hard_before = REGISTRY.get_sample_value("svd_budget_hard_limit_total") or 0.0
    with pytest.raises(BudgetExceeded) as refused:
        await budgets.check(owner, 0.40)
    assert refused.value.status == 402 and refused.value.code == "budget_exceeded"
    assert REGISTRY.get_sample_value("svd_budget_hard_limit_total") == hard_before + 1
    unlimited = Budgets(Settings(), CostLedger(jobs._sessions))
    assert (await unlimited.check(owner, 1000.0)).budget_usd == 0.0


# At the ingress ---------------------------------------------------------------------------------


@dataclass
class Ingress:
    client: httpx.AsyncClient
    services: Services
    owner: str


@pytest.fixture(params=["without_provider_keys", "with_provider_keys"])
async def ingress(
    request: pytest.FixtureRequest, pg_database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> AsyncIterator[Ingress]:
    await _upgrade(pg_database_url)
    owner = f"dave-{unique_prefix}"
    settings = Settings(
        data_dir=tmp_path, database_url=pg_database_url, redis_url=redis_url, queue_name=unique_prefix,
        key_prefix=unique_prefix, api_keys=f"{owner}:key-dave",  # type: ignore[arg-type]
        storage_dir=tmp_path / "storage", owner_budgets_usd=f"{owner}=0.5", local_job_seconds_estimate=36.0,
        gpu_hour_price_usd=2.0,
        runway_api_key=SecretStr("key_runway" if request.param == "with_provider_keys" else ""),
        fal_api_key=SecretStr("key_fal" if request.param == "with_provider_keys" else ""),
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={"Authorization": "Bearer key-dave"}
        ) as client:
            yield Ingress(client, app.state.services, owner)
        await app.state.services.queue.obliterate()


async def _upgrade(url: str) -> None:
    import asyncio

    await asyncio.to_thread(upgrade, url)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


async def submit(ingress: Ingress, headers: dict[str, str] | None = None, **data: str) -> httpx.Response:
    return await ingress.client.post(
        "/api/v1/animate-image", files={"image": ("in.png", png(), "image/png")}, data={"numFrames": "4", **data},
        headers=headers,
    )


async def test_ingress_estimates_then_refuses_past_the_budget_with_402(ingress: Ingress) -> None:
    accepted = await submit(ingress, headers={"Idempotency-Key": "first"})
    assert accepted.status_code == 202, accepted.text
    status = (await ingress.client.get(f"/api/v1/animate-image/status/{accepted.json()['jobId']}")).json()
    assert status["estimatedCostUsd"] == pytest.approx(0.02) and status["costUsd"] is None  # 36 s at $2/h

    await finished_job(ingress.services.jobs, ingress.owner, 0.49)  # 0.49 + 0.02 > 0.50
    refused = await submit(ingress)
    assert refused.status_code == 402
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["code"] == "budget_exceeded" and "$0.50" in problem["detail"]
    records, _ = await ingress.services.jobs.list_for_owner(ingress.owner, limit=10)
    assert len(records) == 2  # the accepted one and the finished one: the refused left no row
    # A repeat of the accepted request is no new job: it gets its job back, budget or not.
    repeat = await submit(ingress, headers={"Idempotency-Key": "first"})
    assert repeat.status_code == 200 and repeat.json()["jobId"] == accepted.json()["jobId"]


async def test_unfinished_jobs_count_against_the_budget_also_when_submitted_at_once(ingress: Ingress) -> None:
    """Jobs accepted but not finished have cost nothing yet; they still count, at their estimate,
    so neither a queue of jobs nor a burst of concurrent submissions runs past the budget."""
    await finished_job(ingress.services.jobs, ingress.owner, 0.45)  # $0.05 left: two jobs of $0.02
    answers = await asyncio.gather(*(submit(ingress) for _ in range(6)))
    assert sorted(a.status_code for a in answers) == [202, 202, 402, 402, 402, 402], [a.text for a in answers]
    refused = next(a.json() for a in answers if a.status_code == 402)
    assert refused["code"] == "budget_exceeded" and "2 unfinished jobs" in refused["detail"]
    records, _ = await ingress.services.jobs.list_for_owner(ingress.owner, limit=10)
    assert len(records) == 3  # the finished one and the two accepted: refusals left no row

    # A re-run of a failed job is a new paid job: refused too while the budget is taken.
    failed = next(r for r in records if r.status is JobStatus.QUEUED)
    await ingress.services.jobs.transition(failed.id, JobStatus.PROCESSING)
    await ingress.services.jobs.transition(failed.id, JobStatus.ERROR, error_code="generation_failed",
                                           error_message="worker lost")
    await ingress.services.queue.remove(failed.id)
    await finished_job(ingress.services.jobs, ingress.owner, 0.02)  # the month now holds $0.47
    retried = await ingress.client.post(f"/api/v1/animate-image/{failed.id}/retry")
    assert retried.status_code == 402, retried.text  # 0.47 + 0.02 pending + 0.02 > 0.50


async def test_ingress_takes_runway_only_with_a_key(ingress: Ingress) -> None:
    answer = await submit(ingress, provider="runway")
    if not ingress.services.settings.runway_api_key.get_secret_value():
        assert answer.status_code == 422 and answer.json()["code"] == "provider_not_configured"
    else:
        assert answer.status_code == 202, answer.text
        status = (await ingress.client.get(f"/api/v1/animate-image/status/{answer.json()['jobId']}")).json()
        # Runway's price: a 4-frame clip bills 5 s x 5 credits x $0.01.
        assert status["estimatedCostUsd"] == pytest.approx(0.25) and status["routingReason"] is None
        job = await ingress.services.jobs.get(answer.json()["jobId"])
        assert job is not None and job.requested_provider == "runway"
    unknown = await submit(ingress, provider="sora")
    assert unknown.status_code == 422


@pytest.mark.parametrize("provider", ["fal", "pika"])
async def test_ingress_takes_fal_only_with_a_key_and_pika_only_with_a_prompt(ingress: Ingress, provider: str) -> None:
    with_prompt = await submit(ingress, provider=provider, prompt="the tide comes in")
    if not ingress.services.settings.fal_api_key.get_secret_value():
        assert with_prompt.status_code == 422 and with_prompt.json()["code"] == "provider_not_configured"
        return
    assert with_prompt.status_code == 202, with_prompt.text
    status = (await ingress.client.get(f"/api/v1/animate-image/status/{with_prompt.json()['jobId']}")).json()
    assert status["estimatedCostUsd"] == pytest.approx(0.20)  # Pika v2.2, 720p: $0.20 per 5 s clip
    job = await ingress.services.jobs.get(with_prompt.json()["jobId"])
    assert job is not None and job.requested_provider == provider
    # Pika requires a prompt: refused before anything is stored, with a code of its own.
    without = await submit(ingress, provider=provider)
    assert without.status_code == 422 and without.json()["code"] == "prompt_required"
    assert "prompt" in without.json()["detail"]
    # The estimate endpoint refuses it the same way (it validates like a submission).
    estimate = await ingress.client.post("/api/v1/estimate", json={"provider": provider, "numFrames": 4})
    assert estimate.status_code == 422 and estimate.json()["code"] == "prompt_required"
    assert estimate.json()["detail"] == without.json()["detail"]
    priced = await ingress.client.post("/api/v1/estimate", json={"provider": provider, "numFrames": 4, "prompt": "waves"})
    assert priced.status_code == 200 and priced.json()["estimatedCostUsd"] == pytest.approx(0.20)
