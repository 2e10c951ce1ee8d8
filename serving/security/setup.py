"""The security services of one ingress, built once in the lifespan from the settings."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.keys import Keys
from serving.netguard import UrlPolicy
from serving.security.api_keys import ApiKeyRepository
from serving.security.auth import Authenticator
from serving.security.quotas import QuotaLimits, Quotas
from serving.security.rate_limits import AuthFailures, TokenBucketLimiter
from serving.settings import Settings


@dataclass
class SecurityServices:
    """Authentication, rate limits, quotas and the outbound URL policy."""

    api_keys: ApiKeyRepository
    authenticator: Authenticator
    rate_limiter: TokenBucketLimiter
    auth_failures: AuthFailures
    quotas: Quotas
    url_policy: UrlPolicy


async def require_a_key_source(settings: Settings, api_keys: ApiKeyRepository) -> None:
    """Production serves only when some key can call it: static keys or an active database key."""
    if settings.environment != "production" or settings.api_key_owners() or await api_keys.any_active():
        return
    raise RuntimeError(
        "No API key exists: set SVD_SERVE_API_KEYS or create one in the database with "
        "`svd-serve keys create --owner <owner> --scopes admin` (docs/production.md)."
    )


def build_security(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: aioredis.Redis, keys: Keys
) -> SecurityServices:
    api_keys = ApiKeyRepository(sessions)
    return SecurityServices(
        api_keys=api_keys,
        authenticator=Authenticator(api_keys, settings.api_key_owners(), disabled=settings.auth_disabled),
        rate_limiter=TokenBucketLimiter(
            redis, keys, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst
        ),
        auth_failures=AuthFailures(
            redis, keys, rate_per_s=settings.auth_failure_rate_per_s, burst=settings.auth_failure_burst
        ),
        quotas=Quotas(
            redis,
            keys,
            sessions,
            QuotaLimits(
                max_concurrent_jobs=settings.max_concurrent_jobs,
                max_jobs_per_day=settings.max_jobs_per_day,
                max_gpu_seconds_per_month=settings.max_gpu_seconds_per_month,
            ),
        ),
        url_policy=UrlPolicy.from_settings(settings),
    )
