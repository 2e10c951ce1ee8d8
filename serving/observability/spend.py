"""Spending against the configured budgets, as gauges read from the jobs table on each scrape.

The alerts compare these with each other (`k8s/monitoring/alerts.yaml`, group svd-serve.cost), so
their thresholds are the budgets the service enforces (`SVD_SERVE_BUDGET_MONTHLY_USD`,
`SVD_SERVE_OWNER_BUDGETS_USD`, `SVD_SERVE_BUDGET_SOFT_FRACTION`), not numbers copied into YAML.
Every ingress pod reads the same rows, so each reports the same values: the alerts take `max`.
"""

from __future__ import annotations

import datetime as dt

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric

from serving.cost import Budgets, BudgetLevel, month_end_forecast

log = structlog.get_logger(__name__)

# The `owner` label of the default budget (SVD_SERVE_BUDGET_MONTHLY_USD, 0: none), which every
# owner without a budget of their own has; no owner id matches it, so no alert compares with it.
DEFAULT_OWNER = "*"
SPEND_METRICS = (
    "svd_spend_up", "svd_budget_usd", "svd_owner_spend_month_usd", "svd_owner_spend_forecast_usd",
    "svd_spend_month_usd", "svd_spend_forecast_usd",
)


async def spend_families(budgets: Budgets, now: dt.datetime | None = None) -> list[Metric]:
    """`svd_budget_usd` (per owner with a budget, hard and soft), the month's spend and its
    month-end forecast per owner and in total. Nothing when the job store cannot be read (the
    scrape still answers; `svd_spend_up` says why the gauges are missing)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    up = GaugeMetricFamily("svd_spend_up", "1 when the spend gauges could be read from the job store")
    try:
        spent = await budgets.ledger.month_by_owner(now)
    except Exception as exc:
        log.warning("spend_read_failed", error=repr(exc))
        up.add_metric([], 0.0)
        return [up]
    up.add_metric([], 1.0)
    budget = GaugeMetricFamily(
        "svd_budget_usd", "An owner's configured monthly budget (hard) and its soft limit", labels=["owner", "limit"]
    )
    budget.add_metric([DEFAULT_OWNER, BudgetLevel.HARD.value], budgets.budget_for(DEFAULT_OWNER))
    budget.add_metric([DEFAULT_OWNER, BudgetLevel.SOFT.value], budgets.soft_limit_for(DEFAULT_OWNER))
    for owner in sorted(set(spent) | budgets.named_owners):
        if budgets.budget_for(owner) > 0:
            budget.add_metric([owner, BudgetLevel.HARD.value], budgets.budget_for(owner))
            budget.add_metric([owner, BudgetLevel.SOFT.value], budgets.soft_limit_for(owner))
    owner_spend = GaugeMetricFamily(
        "svd_owner_spend_month_usd", "What an owner's jobs that ended this UTC month cost, failed ones included",
        labels=["owner"],
    )
    owner_forecast = GaugeMetricFamily(
        "svd_owner_spend_forecast_usd", "An owner's month-end spend at the month's rate so far", labels=["owner"]
    )
    for owner, usd in sorted(spent.items()):
        owner_spend.add_metric([owner], usd)
        owner_forecast.add_metric([owner], month_end_forecast(usd, now))
    total = sum(spent.values())
    total_spend = GaugeMetricFamily("svd_spend_month_usd", "What jobs that ended this UTC month cost, all owners",
                                    value=total)
    total_forecast = GaugeMetricFamily("svd_spend_forecast_usd", "Month-end spend of all owners at the rate so far",
                                       value=month_end_forecast(total, now))
    return [up, budget, owner_spend, owner_forecast, total_spend, total_forecast]
