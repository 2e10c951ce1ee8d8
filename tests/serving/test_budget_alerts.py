"""Budget alerts: the configured budgets are exported beside the month's spend, the alert rules in
k8s/monitoring/alerts.yaml compare the two on a real scrape of the ingress, failed jobs' spend
counts, the month-end forecast is shown, and a signed `budget.threshold` webhook goes out once."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from serving.cost import month_end_forecast
from serving.ingress.app import create_app
from serving.ingress.deps import Services
from serving.metrics import read_worker_metrics
from serving.settings import Settings
from serving.types import JobStatus
from serving.webhooks.budget_alerts import BudgetWebhook
from tests.promql import evaluate, scrape_samples
from tests.serving.test_ingress import png_bytes
from tests.serving.webhook_helpers import Receiver, running_receiver

ALERTS = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "alerts.yaml"
SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD3CUf1w/Iw6s="
BUDGET = 10.0


def alert_expr(name: str) -> str:
    rules = yaml.safe_load(ALERTS.read_text())
    (expr,) = [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"] if r.get("alert") == name]
    return str(expr)


@dataclass
class App:
    client: httpx.AsyncClient
    services: Services
    alice: str
    bob: str

    async def ended_job(self, owner: str, status: JobStatus, cost_usd: float) -> None:
        """A job that ran and ended in `status` having cost `cost_usd`, moved there through the
        ingress's lifecycle (its row, events and metrics), as the runner moves its jobs."""
        lifecycle = self.services.lifecycle()
        job_id = str(uuid.uuid4())
        await lifecycle.create(job_id=job_id, owner_id=owner, image_url="file:///in.png", params={},
                               model="tiny-random", priority="normal")
        await lifecycle.transition(job_id, JobStatus.PROCESSING, stage="loading", attempts=1)
        changes = {"error_code": "generation_failed", "error_message": "boom"} if status is JobStatus.ERROR else {}
        await lifecycle.transition(job_id, status, cost_usd=cost_usd, provider="runway", **changes)  # type: ignore[arg-type]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver(Receiver(secrets={"current": SECRET})) as running:
        yield running


@pytest.fixture
async def app(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path,
              receiver: Receiver) -> AsyncIterator[App]:
    alice, bob = f"alice-{unique_prefix}", f"bob-{unique_prefix}"
    settings = Settings(
        data_dir=tmp_path, database_url=database_url, redis_url=redis_url, queue_name=unique_prefix,
        key_prefix=unique_prefix, storage_dir=tmp_path / "storage",
        api_keys=f"{alice}:key-alice,{bob}:key-bob",  # type: ignore[arg-type]
        owner_budgets_usd=f"{alice}={BUDGET},{bob}={BUDGET}", budget_soft_fraction=0.8,
        budget_webhook_url=receiver.url, webhook_secrets=SECRET,  # type: ignore[arg-type]
        allow_private_urls=True, allow_http_urls=True,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     headers={"Authorization": "Bearer key-alice"}) as client:
            yield App(client, application.state.services, alice, bob)
        await application.state.services.queue.obliterate()


async def test_soft_limit_alert_fires_on_a_real_scrape_at_80_percent(app: App) -> None:
    # alice: 5.00 completed + 3.00 failed (charged by its provider) = 8.00, 80% of her budget;
    # bob: 7.00, 70% of his.
    await app.ended_job(app.alice, JobStatus.COMPLETED, 5.0)
    await app.ended_job(app.alice, JobStatus.ERROR, 3.0)
    await app.ended_job(app.bob, JobStatus.COMPLETED, 7.0)
    scrape = await app.client.get("/metrics")
    assert scrape.status_code == 200
    samples = scrape_samples(scrape.text)
    firing = evaluate(alert_expr("SvdOwnerBudgetSoftLimit"), samples)
    assert firing == {frozenset({("owner", app.alice)}): pytest.approx(8.0)}
    assert evaluate(alert_expr("SvdOwnerMonthlyBudget"), samples) == {}
    # The threshold is the configured budget, not a number in the rule.
    assert evaluate('svd_budget_usd{limit="soft"}', samples)[frozenset({("owner", app.alice), ("limit", "soft")})] \
        == pytest.approx(0.8 * BUDGET)
    # A failed job's spend reaches the spend counter too (the lifecycle counts every ended job).
    families = await read_worker_metrics(app.services.redis, app.services.keys)
    spend = {(s.labels["owner"], s.labels["provider"]): s.value for f in families for s in f.samples
             if s.name == "svd_owner_cost_usd_total"}
    assert spend[(app.alice, "runway")] == pytest.approx(8.0)

    # Past the budget itself, the hard alert fires as well.
    await app.ended_job(app.alice, JobStatus.COMPLETED, 2.5)
    samples = scrape_samples((await app.client.get("/metrics")).text)
    assert set(evaluate(alert_expr("SvdOwnerMonthlyBudget"), samples)) == {frozenset({("owner", app.alice)})}


async def test_usage_shows_spend_and_the_month_end_forecast(app: App) -> None:
    await app.ended_job(app.alice, JobStatus.ERROR, 3.0)
    before = dt.datetime.now(dt.timezone.utc)
    usage = (await app.client.get("/api/v1/usage")).json()
    after = dt.datetime.now(dt.timezone.utc)
    assert usage["spentUsd"] == pytest.approx(3.0)
    assert usage["budgetUsd"] == BUDGET and usage["softLimitUsd"] == pytest.approx(0.8 * BUDGET)
    assert usage["month"] == before.strftime("%Y-%m")
    # The forecast falls as the month goes by: it lies between the two ends of the request.
    assert month_end_forecast(3.0, after) <= usage["forecastUsd"] <= month_end_forecast(3.0, before)
    assert usage["forecastUsd"] >= 3.0
    samples = scrape_samples((await app.client.get("/metrics")).text)
    forecast = evaluate("svd_owner_spend_forecast_usd", samples)[frozenset({("owner", app.alice)})]
    assert month_end_forecast(3.0, after) * 0.999 <= forecast <= month_end_forecast(3.0, before) * 1.001
    assert evaluate("svd_spend_forecast_usd", samples)[frozenset()] >= forecast


def test_month_end_forecast_is_linear_over_the_utc_month() -> None:
    # 15 of December's 31 days gone: the month ends at 31/15 of the spend so far.
    assert month_end_forecast(15.0, dt.datetime(2026, 12, 16, tzinfo=dt.timezone.utc)) == pytest.approx(31.0)
    # The first day counts whole: an hour's spend is not projected at an hourly rate.
    assert month_end_forecast(1.0, dt.datetime(2026, 2, 1, 1, tzinfo=dt.timezone.utc)) == pytest.approx(28.0)


async def test_budget_threshold_webhook_is_signed_and_sent_once(app: App, receiver: Receiver) -> None:
    await app.ended_job(app.alice, JobStatus.COMPLETED, 8.5)  # past the soft limit, within the budget
    for _ in range(2):
        response = await app.client.post("/api/v1/animate-image",
                                         files={"image": ("in.png", png_bytes(), "image/png")})
        assert response.status_code == 202, response.text
    webhook = app.services.budgets.alerts
    assert isinstance(webhook, BudgetWebhook)
    await webhook.settle()  # sent in the background: the submission never waits on the receiver
    assert len(receiver.received) == 1
    (message,) = receiver.received
    assert message.verified_by == ["current"]  # Standard Webhooks, like every webhook we send
    body = json.loads(message.body)
    assert body["type"] == "budget.threshold"
    assert body["data"]["ownerId"] == app.alice and body["data"]["level"] == "soft"
    assert body["data"]["budgetUsd"] == BUDGET and body["data"]["committedUsd"] >= 8.5
    # bob is far from his limit: nothing is sent for him.
    response = await app.client.post("/api/v1/animate-image", files={"image": ("in.png", png_bytes(), "image/png")},
                                     headers={"Authorization": "Bearer key-bob"})
    await webhook.settle()
    assert response.status_code == 202 and len(receiver.received) == 1
