"""What a job costs, what an owner spent this month, and the owner's budget (issue #6).

A local job costs its GPU-seconds (measured on the replica; a batch's time is shared across its
jobs by `share_batch`) at the configured GPU-hour price, spot or on-demand. A Runway job costs the
credits Runway reports on the finished task at the configured credit price. Monthly totals are
summed from the jobs table (the system of record), by the time each job ended. A budget counts
what the month spent plus the estimates of the owner's jobs that have not ended yet, so that a
queue of accepted jobs cannot run past it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import structlog
from prometheus_client import Counter
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.db.models import Job
from serving.errors import BudgetExceeded, InvalidInput
from serving.settings import Settings
from serving.types import ACTIVE_STATUS_VALUES, JobParams

log = structlog.get_logger(__name__)
jobs = cast(Table, Job.__table__)

BUDGET_SOFT_LIMIT = Counter(
    "svd_budget_soft_limit_total", "Submissions accepted past an owner's soft budget limit"
)
BUDGET_HARD_LIMIT = Counter("svd_budget_hard_limit_total", "Submissions refused by an owner's hard budget limit")

# Runway's image_to_video durations (seconds) for gen4_turbo; a clip maps to the nearest.
RUNWAY_DURATIONS_S = (5, 10)


@dataclass(frozen=True)
class Prices:
    """Prices in USD: one GPU-hour (the tier in use) and one Runway credit."""

    gpu_hour_usd: float
    credit_usd: float
    credits_per_second: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Prices:
        hour = settings.gpu_hour_spot_price_usd if settings.gpu_pricing == "spot" else settings.gpu_hour_price_usd
        return cls(
            gpu_hour_usd=hour,
            credit_usd=settings.runway_credit_price_usd,
            credits_per_second=settings.runway_credits_per_second,
        )

    def gpu_cost(self, gpu_seconds: float) -> float:
        return round(gpu_seconds / 3600.0 * self.gpu_hour_usd, 6)

    def credits_cost(self, credits: float) -> float:
        return round(credits * self.credit_usd, 6)


@dataclass(frozen=True)
class CostEstimate:
    """What a job is expected to cost on one provider, before it runs."""

    provider: str
    usd: float
    gpu_seconds: float | None = None
    credits: float | None = None


def runway_duration_s(params: JobParams) -> int:
    """The Runway clip length closest to the requested clip (frames / fps)."""
    seconds = params.num_frames / max(1, params.fps)
    return min(RUNWAY_DURATIONS_S, key=lambda d: (abs(d - seconds), d))


def estimate(params: JobParams, provider: str, prices: Prices, local_job_seconds: float) -> CostEstimate:
    """Expected cost of `params` on `provider` ("local" or "runway")."""
    if provider == "runway":
        credits = runway_duration_s(params) * prices.credits_per_second
        return CostEstimate("runway", prices.credits_cost(credits), credits=credits)
    return CostEstimate("local", prices.gpu_cost(local_job_seconds), gpu_seconds=local_job_seconds)


def share_batch(gpu_seconds: float, work: Sequence[float]) -> list[float]:
    """Split a batch's measured GPU-seconds across its jobs in proportion to each job's work
    (frames x steps, say), so a job pays for what it used whatever it was batched with."""
    if any(w < 0 or math.isnan(w) for w in work):
        raise ValueError("work shares must be non-negative numbers")
    total = float(sum(work))
    if not work:
        return []
    if total == 0:
        return [gpu_seconds / len(work)] * len(work)
    return [gpu_seconds * w / total for w in work]


def month_start(now: dt.datetime) -> dt.datetime:
    return dt.datetime(now.year, now.month, 1, tzinfo=dt.timezone.utc)


class CostLedger:
    """Per-owner spending, read from the jobs table."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def month_total(self, owner_id: str | None, now: dt.datetime | None = None) -> float:
        """USD of the owner's jobs (every owner's with None) that ended in the current UTC month."""
        now = now or dt.datetime.now(dt.timezone.utc)
        stmt = select(func.coalesce(func.sum(jobs.c.cost_usd), 0.0)).where(jobs.c.completed_at >= month_start(now))
        if owner_id is not None:
            stmt = stmt.where(jobs.c.owner_id == owner_id)
        async with self._sessions() as session:
            return float(await session.scalar(stmt) or 0.0)

    async def pending(self, owner_id: str, estimate_of: Callable[[JobParams, str], float]) -> tuple[float, int]:
        """(expected USD, count) of the owner's jobs that have not ended: queued or running,
        each at `estimate_of(params, requested provider)`. Bounded by the per-owner limit on
        concurrent jobs."""
        stmt = select(jobs.c.params, jobs.c.requested_provider).where(
            jobs.c.owner_id == owner_id, jobs.c.status.in_(ACTIVE_STATUS_VALUES)
        )
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        return sum(estimate_of(JobParams.from_json(params), provider) for params, provider in rows), len(rows)


@dataclass(frozen=True)
class BudgetCheck:
    """An owner's standing against the monthly budget at one submission."""

    budget_usd: float  # 0: no budget
    spent_usd: float  # jobs that ended this month
    estimate_usd: float  # this job
    soft_limit_reached: bool
    pending_usd: float = 0.0  # the owner's jobs that have not ended, at their estimates


class Budgets:
    """Monthly budgets per owner: past the soft share a log line and a metric, past the budget
    itself new jobs are refused with 402 `budget_exceeded`."""

    def __init__(self, settings: Settings, ledger: CostLedger) -> None:
        self._settings = settings
        self._default = settings.budget_monthly_usd
        self._overrides = parse_owner_budgets(settings.owner_budgets_usd)
        self._soft_fraction = settings.budget_soft_fraction
        self._ledger = ledger

    @property
    def ledger(self) -> CostLedger:
        return self._ledger

    def budget_for(self, owner_id: str) -> float:
        return self._overrides.get(owner_id, self._default)

    async def check(self, owner_id: str, estimate_usd: float, now: dt.datetime | None = None) -> BudgetCheck:
        budget = self.budget_for(owner_id)
        if budget <= 0:
            return BudgetCheck(0.0, 0.0, estimate_usd, False)
        spent = await self._ledger.month_total(owner_id, now)
        pending, pending_jobs = await self._ledger.pending(
            owner_id, lambda params, provider: job_estimate(self._settings, params, provider).usd
        )
        if spent + pending + estimate_usd > budget:
            BUDGET_HARD_LIMIT.inc()
            log.warning("budget_hard_limit", owner_id=owner_id, spent_usd=spent, pending_usd=pending,
                        budget_usd=budget)
            unfinished = f" plus about ${pending:.2f} for {pending_jobs} unfinished jobs" if pending_jobs else ""
            raise BudgetExceeded(
                f"This job (about ${estimate_usd:.2f}) would take this month's spending "
                f"(${spent:.2f}{unfinished}) past your budget of ${budget:.2f}; it resets on the 1st (UTC)."
            )
        soft = spent + pending + estimate_usd >= budget * self._soft_fraction
        if soft:
            BUDGET_SOFT_LIMIT.inc()
            log.warning("budget_soft_limit", owner_id=owner_id, spent_usd=spent, pending_usd=pending,
                        budget_usd=budget)
        return BudgetCheck(budget, spent, estimate_usd, soft, pending)


def parse_owner_budgets(raw: str) -> dict[str, float]:
    """`"acme=100,beta=20.5"` -> {"acme": 100.0, "beta": 20.5}."""
    budgets: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        owner, sep, amount = item.partition("=")
        message = f"SVD_SERVE_OWNER_BUDGETS_USD entries must look like owner=amount, not {item!r}"
        if not sep or not owner.strip():
            raise ValueError(message)
        try:
            budgets[owner.strip()] = float(amount)
        except ValueError:
            raise ValueError(message) from None
    return budgets


def job_estimate(settings: Settings, params: JobParams, requested_provider: str) -> CostEstimate:
    """The estimate a client sees: on Runway when asked for, otherwise on the local pool (where
    `auto` goes unless a fallback rule fires)."""
    provider = "runway" if requested_provider == "runway" else "local"
    return estimate(params, provider, Prices.from_settings(settings), settings.local_job_seconds_estimate)


def check_provider(settings: Settings, requested_provider: str) -> None:
    """`runway` without a configured key is refused (422 `provider_not_configured`)."""
    if requested_provider == "runway" and not settings.runway_api_key.get_secret_value():
        raise InvalidInput("provider 'runway' is not configured on this server.", code="provider_not_configured")


async def admit_cost(
    settings: Settings, budgets: Budgets, owner_id: str, params: JobParams, requested_provider: str
) -> CostEstimate:
    """The estimate of a new job, refused (402 `budget_exceeded`) past the owner's budget."""
    expected = job_estimate(settings, params, requested_provider)
    await budgets.check(owner_id, expected.usd)
    return expected
