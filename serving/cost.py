"""What a job costs, what an owner spent this month, and the owner's budget (issue #6).

A local job costs its GPU-seconds (measured on the replica; a batch's time is shared across its
jobs by `share_batch`) at the configured GPU-hour price, spot or on-demand. A Runway job costs the
credits Runway reports on the finished task at the configured credit price. A fal job costs its
model's list price per output second (`FAL_PRICES`; fal reports no cost per request). Monthly totals are
summed from the jobs table (the system of record), by the time each job ended. A budget counts
what the month spent plus the estimates of the owner's jobs that have not ended yet, so that a
queue of accepted jobs cannot run past it.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import structlog
from prometheus_client import Counter
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.db.models import Job
from serving.errors import BudgetExceeded, InvalidInput
from serving.provider_names import FAL, LOCAL, MANAGED, RUNWAY, canonical
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
# Pika's (and Kling's) durations on fal; likewise.
FAL_DURATIONS_S = (5, 10)


@dataclass(frozen=True)
class FalPrice:
    """A fal model's list price per output second, by resolution, and where it was read."""

    per_second_usd: dict[str, float]
    source: str
    checked: str  # the date the price was read


# fal's list prices (fal bills per clip, not per GPU-second). Prices change: docs/providers.md.
FAL_PRICES: dict[str, FalPrice] = {
    # "5 second video at 720p costs $0.20. 5 second video at 1080p costs $0.45."
    "fal-ai/pika/v2.2/image-to-video": FalPrice(
        {"720p": 0.04, "1080p": 0.09},
        "https://fal.ai/models/fal-ai/pika/v2.2/image-to-video/llms.txt", "2026-12-02",
    ),
    # "$0.08 per video second for 720p, $0.06 per video second for 580p, $0.04 ... for 480p"
    "fal-ai/wan/v2.2-a14b/image-to-video": FalPrice(
        {"720p": 0.08, "580p": 0.06, "480p": 0.04},
        "https://fal.ai/models/fal-ai/wan/v2.2-a14b/image-to-video/llms.txt", "2026-12-02",
    ),
}


@dataclass(frozen=True)
class Prices:
    """Prices in USD: one GPU-hour (the tier in use) and one Runway credit."""

    gpu_hour_usd: float
    credit_usd: float
    credits_per_second: float
    fal_second_usd: float = 0.0  # the configured fal model at its resolution

    @classmethod
    def from_settings(cls, settings: Settings) -> Prices:
        hour = settings.gpu_hour_spot_price_usd if settings.gpu_pricing == "spot" else settings.gpu_hour_price_usd
        return cls(
            gpu_hour_usd=hour,
            credit_usd=settings.runway_credit_price_usd,
            credits_per_second=settings.runway_credits_per_second,
            fal_second_usd=fal_second_usd(settings),
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


def nearest_duration_s(params: JobParams, durations: Sequence[int]) -> int:
    """The provider's clip length closest to the requested clip (frames / fps)."""
    seconds = params.num_frames / max(1, params.fps)
    return min(durations, key=lambda d: (abs(d - seconds), d))


def runway_duration_s(params: JobParams) -> int:
    return nearest_duration_s(params, RUNWAY_DURATIONS_S)


def fal_duration_s(params: JobParams) -> int:
    return nearest_duration_s(params, FAL_DURATIONS_S)


def fal_second_usd(settings: Settings) -> float:
    """The configured fal model's price per output second: the table's, else the setting."""
    price = FAL_PRICES.get(settings.fal_model)
    if price is not None and settings.fal_resolution in price.per_second_usd:
        return price.per_second_usd[settings.fal_resolution]
    return settings.fal_price_per_second_usd


def estimate(params: JobParams, provider: str, prices: Prices, local_job_seconds: float) -> CostEstimate:
    """Expected cost of `params` on `provider` (`local`, `runway`, `fal`)."""
    if provider == RUNWAY:
        credits = runway_duration_s(params) * prices.credits_per_second
        return CostEstimate(RUNWAY, prices.credits_cost(credits), credits=credits)
    if provider == FAL:
        return CostEstimate(FAL, round(fal_duration_s(params) * prices.fal_second_usd, 6))
    return CostEstimate(LOCAL, prices.gpu_cost(local_job_seconds), gpu_seconds=local_job_seconds)


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


def next_month_start(now: dt.datetime) -> dt.datetime:
    return dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.timezone.utc)


# A forecast extrapolates at least one day: a job in the month's first minutes must not project
# a month of that job's cost per minute.
FORECAST_MIN_ELAPSED_S = 24 * 3600.0


def month_end_forecast(spent_usd: float, now: dt.datetime) -> float:
    """Where this month's spending ends if it goes on at its rate so far (linear, UTC month)."""
    start, end = month_start(now), next_month_start(now)
    elapsed = max((now - start).total_seconds(), FORECAST_MIN_ELAPSED_S)
    return round(spent_usd * (end - start).total_seconds() / elapsed, 6)


class CostLedger:
    """Per-owner spending, read from the jobs table."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def month_by_owner(self, now: dt.datetime | None = None) -> dict[str, float]:
        """USD per owner of the jobs that ended in the current UTC month, in any terminal state
        (a failed job that used a GPU or a paid provider cost what it recorded)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        stmt = (
            select(jobs.c.owner_id, func.sum(jobs.c.cost_usd))
            .where(jobs.c.completed_at >= month_start(now), jobs.c.cost_usd.is_not(None))
            .group_by(jobs.c.owner_id)
        )
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        return {owner: float(total or 0.0) for owner, total in rows}

    async def month_total(self, owner_id: str | None, now: dt.datetime | None = None) -> float:
        """USD of the owner's jobs (every owner's with None) that ended in the current UTC month
        (failed ones included)."""
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


class BudgetLevel(str, enum.Enum):
    SOFT = "soft"  # `budget_soft_fraction` of the budget
    HARD = "hard"  # the budget itself: new jobs are refused


class BudgetAlertSink(Protocol):
    """Told when an owner's committed spending (ended jobs, unfinished ones at their estimates,
    and the job being admitted) reaches a budget level."""

    async def threshold_reached(
        self, owner_id: str, level: BudgetLevel, *, committed_usd: float, budget_usd: float
    ) -> None: ...


@dataclass(frozen=True)
class BudgetStanding:
    """An owner's month so far, as the usage endpoint shows it (budget 0: none)."""

    owner_id: str
    month: str  # YYYY-MM, UTC
    spent_usd: float  # jobs that ended this month, failed ones included
    forecast_usd: float  # the month's end at the rate so far
    budget_usd: float
    soft_limit_usd: float


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

    def __init__(self, settings: Settings, ledger: CostLedger, alerts: BudgetAlertSink | None = None) -> None:
        self._settings = settings
        self._default = settings.budget_monthly_usd
        self._overrides = parse_owner_budgets(settings.owner_budgets_usd)
        self._soft_fraction = settings.budget_soft_fraction
        self._ledger = ledger
        self._alerts = alerts  # told when an owner reaches a limit (the `budget.threshold` webhook)

    @property
    def ledger(self) -> CostLedger:
        return self._ledger

    def budget_for(self, owner_id: str) -> float:
        return self._overrides.get(owner_id, self._default)

    def soft_limit_for(self, owner_id: str) -> float:
        return self.budget_for(owner_id) * self._soft_fraction

    @property
    def alerts(self) -> BudgetAlertSink | None:
        """Where budget levels are reported (the `budget.threshold` webhook), if anywhere."""
        return self._alerts

    @property
    def named_owners(self) -> frozenset[str]:
        """Owners with a budget of their own (SVD_SERVE_OWNER_BUDGETS_USD)."""
        return frozenset(self._overrides)

    async def standing(self, owner_id: str, now: dt.datetime | None = None) -> BudgetStanding:
        """The owner's month so far: spent, budget and limits, and where the month ends."""
        now = now or dt.datetime.now(dt.timezone.utc)
        spent = await self.ledger.month_total(owner_id, now)
        return BudgetStanding(
            owner_id=owner_id,
            month=month_start(now).strftime("%Y-%m"),
            spent_usd=round(spent, 6),
            forecast_usd=month_end_forecast(spent, now),
            budget_usd=self.budget_for(owner_id),
            soft_limit_usd=round(self.soft_limit_for(owner_id), 6),
        )

    async def check(self, owner_id: str, estimate_usd: float, now: dt.datetime | None = None) -> BudgetCheck:
        budget = self.budget_for(owner_id)
        if budget <= 0:
            return BudgetCheck(0.0, 0.0, estimate_usd, False)
        spent = await self.ledger.month_total(owner_id, now)
        pending, pending_jobs = await self.ledger.pending(
            owner_id, lambda params, provider: job_estimate(self._settings, params, provider).usd
        )
        if spent + pending + estimate_usd > budget:
            BUDGET_HARD_LIMIT.inc()
            log.warning("budget_hard_limit", owner_id=owner_id, spent_usd=spent, pending_usd=pending,
                        budget_usd=budget)
            await self._alert(owner_id, BudgetLevel.HARD, spent + pending, budget)
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
            await self._alert(owner_id, BudgetLevel.SOFT, spent + pending + estimate_usd, budget)
        return BudgetCheck(budget, spent, estimate_usd, soft, pending)

    async def _alert(self, owner_id: str, level: BudgetLevel, committed_usd: float, budget_usd: float) -> None:
        if self._alerts is None:
            return
        try:
            await self._alerts.threshold_reached(owner_id, level, committed_usd=committed_usd, budget_usd=budget_usd)
        except Exception as exc:  # an alert that cannot be sent must not change the answer
            log.warning("budget_alert_failed", owner_id=owner_id, level=level.value, error=repr(exc))


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
    """The estimate a client sees: on a managed provider when asked for by name, otherwise on
    the local pool (where `auto` goes unless a fallback rule fires)."""
    provider = canonical(requested_provider)
    provider = provider if provider in MANAGED else LOCAL
    return estimate(params, provider, Prices.from_settings(settings), settings.local_job_seconds_estimate)


def check_provider(settings: Settings, requested_provider: str, prompt: str | None = None) -> None:
    """A managed provider without a configured key is refused (422 `provider_not_configured`);
    so is a fal job without a prompt when no default prompt is set (Pika requires one)."""
    provider = canonical(requested_provider)
    if provider in MANAGED and provider not in settings.configured_providers():
        raise InvalidInput(
            f"provider {requested_provider!r} is not configured on this server.", code="provider_not_configured"
        )
    if provider == FAL and not (prompt or "").strip() and not settings.fal_default_prompt:
        raise InvalidInput(
            f"provider {requested_provider!r} ({settings.fal_model}) needs a prompt that describes the motion.",
            code="prompt_required",
        )


async def admit_cost(
    settings: Settings, budgets: Budgets, owner_id: str, params: JobParams, requested_provider: str
) -> CostEstimate:
    """The estimate of a new job, refused (402 `budget_exceeded`) past the owner's budget."""
    expected = job_estimate(settings, params, requested_provider)
    await budgets.check(owner_id, expected.usd)
    return expected
