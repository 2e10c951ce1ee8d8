"""Per-owner quotas checked before a submission is read: concurrent jobs, jobs per UTC day,
GPU-seconds per UTC calendar month.

Concurrency and GPU-seconds are read from the jobs table, the system of record, so no counter
can drift when a worker dies; jobs per day is a Redis counter reserved before the submission
and given back when it is refused or answered from the Idempotency-Key. Concurrent submissions
of one owner may overshoot the concurrency limit by the number racing (each is rate limited).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.db.models import Job
from serving.errors import RateLimited
from serving.keys import Keys
from serving.types import ACTIVE_STATUS_VALUES

jobs = cast(Table, Job.__table__)
# A slot frees when one of the owner's jobs ends, which we cannot predict: a polite poll interval.
CONCURRENCY_RETRY_AFTER_S = 30

# KEYS[1] day counter; ARGV: limit, ttl. Returns the new count, or -1 when the limit is reached.
RESERVE_LUA = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return -1 end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return n
"""
# Gives one reservation back, without resurrecting a counter that already expired.
RELEASE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(redis.call('GET', KEYS[1])) > 0 then
  return redis.call('DECR', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class QuotaLimits:
    max_concurrent_jobs: int = 0  # 0: unlimited
    max_jobs_per_day: int = 0
    max_gpu_seconds_per_month: float = 0.0


def _quota_headers(limit: float, remaining: float, reset_s: int) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(math.floor(limit)),
        "RateLimit-Remaining": str(max(0, math.floor(remaining))),
        "RateLimit-Reset": str(reset_s),
    }


def _next_day(now: dt.datetime) -> dt.datetime:
    return dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)


def _month_start(now: dt.datetime) -> dt.datetime:
    return dt.datetime(now.year, now.month, 1, tzinfo=dt.timezone.utc)


def _next_month(now: dt.datetime) -> dt.datetime:
    return dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class JobReservation:
    """A day slot taken for one submission; `release` gives it back (at most once)."""

    _quotas: Quotas | None
    owner_id: str
    day: str
    _released: bool = field(default=False)

    async def release(self) -> None:
        if self._quotas is None or self._released:
            return
        self._released = True
        await self._quotas._release(self.owner_id, self.day)


class Quotas:
    """Checks an owner's quotas before a submission; raises `RateLimited` (429) when one is spent."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, sessions: async_sessionmaker[AsyncSession], limits: QuotaLimits
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._sessions = sessions
        self.limits = limits
        self._reserve = redis.register_script(RESERVE_LUA)
        self._release_script = redis.register_script(RELEASE_LUA)

    async def active_jobs(self, owner_id: str) -> int:
        stmt = select(func.count()).select_from(jobs).where(jobs.c.owner_id == owner_id, jobs.c.status.in_(ACTIVE_STATUS_VALUES))
        async with self._sessions() as session:
            return int(await session.scalar(stmt) or 0)

    async def gpu_seconds_since(self, owner_id: str, since: dt.datetime) -> float:
        stmt = select(func.coalesce(func.sum(jobs.c.gpu_seconds), 0.0)).where(
            jobs.c.owner_id == owner_id, jobs.c.created_at >= since
        )
        async with self._sessions() as session:
            return float(await session.scalar(stmt) or 0.0)

    async def jobs_today(self, owner_id: str, now: dt.datetime | None = None) -> int:
        day = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d")
        return int(await self._redis.get(self._keys.jobs_per_day(owner_id, day)) or 0)

    async def reserve_job(self, owner_id: str, now: dt.datetime | None = None) -> JobReservation:
        """Check every quota for one more job of `owner_id` and take its day slot."""
        now = now or dt.datetime.now(dt.timezone.utc)
        limits = self.limits
        if limits.max_concurrent_jobs > 0:
            active = await self.active_jobs(owner_id)
            if active >= limits.max_concurrent_jobs:
                raise RateLimited(
                    f"{active} of your jobs are queued or running; at most {limits.max_concurrent_jobs} at once.",
                    code="too_many_concurrent_jobs",
                    retry_after_s=CONCURRENCY_RETRY_AFTER_S,
                    headers=_quota_headers(limits.max_concurrent_jobs, 0, CONCURRENCY_RETRY_AFTER_S),
                )
        if limits.max_gpu_seconds_per_month > 0:
            used = await self.gpu_seconds_since(owner_id, _month_start(now))
            if used >= limits.max_gpu_seconds_per_month:
                reset = math.ceil((_next_month(now) - now).total_seconds())
                raise RateLimited(
                    f"This month's GPU time ({limits.max_gpu_seconds_per_month:g} s) is used up.",
                    code="gpu_quota_exceeded",
                    retry_after_s=reset,
                    headers=_quota_headers(limits.max_gpu_seconds_per_month, 0, reset),
                )
        day = now.strftime("%Y%m%d")
        if limits.max_jobs_per_day <= 0:
            return JobReservation(None, owner_id, day)
        count = int(await self._reserve(keys=[self._keys.jobs_per_day(owner_id, day)],
                                        args=[limits.max_jobs_per_day, 2 * 24 * 3600]))
        if count < 0:
            reset = math.ceil((_next_day(now) - now).total_seconds())
            raise RateLimited(
                f"Today's job quota ({limits.max_jobs_per_day}) is used up; it resets at 00:00 UTC.",
                code="daily_quota_exceeded",
                retry_after_s=reset,
                headers=_quota_headers(limits.max_jobs_per_day, 0, reset),
            )
        return JobReservation(self, owner_id, day)

    async def _release(self, owner_id: str, day: str) -> None:
        await self._release_script(keys=[self._keys.jobs_per_day(owner_id, day)])
