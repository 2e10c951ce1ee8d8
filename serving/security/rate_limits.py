"""Request rates: token buckets in Redis, updated atomically by one Lua script.

The script reads the clock of Redis itself (`TIME`), so every ingress replica shares one clock
and one bucket per key. The answer carries what the IETF RateLimit headers need. Two limiters
use it: requests per API key, and failed authentications per client address (`AuthFailures`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from serving.errors import RateLimited
from serving.keys import Keys

# KEYS[1] bucket; ARGV: rate (tokens/s), burst (capacity), cost, and "1" to only look (take
# nothing). Returns {allowed, tokens, retry_ms}.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local look_only = ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  ts = now
end
local allowed = 0
local retry_ms = 0
if tokens >= cost then
  if not look_only then
    tokens = tokens - cost
  end
  allowed = 1
else
  retry_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {allowed, tostring(tokens), retry_ms}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # 0 when allowed
    window_s: int

    def headers(self) -> dict[str, str]:
        """RateLimit-* headers (draft-ietf-httpapi-ratelimit-headers), plus Retry-After on refusal."""
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
            "RateLimit-Policy": f"{self.limit};w={self.window_s}",
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class TokenBucketLimiter:
    """`rate_per_s` requests per second on average, bursts of up to `burst`; 0 disables it.
    `bucket` names the Redis key of a subject's bucket (default: an API key's)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        rate_per_s: float,
        burst: int,
        bucket: Callable[[str], str] | None = None,
    ) -> None:
        self._redis = redis
        self._bucket = bucket or keys.rate_bucket
        self.rate_per_s = rate_per_s
        self.burst = max(1, burst)
        self._script = redis.register_script(TOKEN_BUCKET_LUA)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    async def decide(self, subject: str, cost: int = 1, *, look_only: bool = False) -> RateDecision | None:
        """Take `cost` tokens from `subject`'s bucket (or, `look_only`, see whether it could);
        None when rate limiting is off."""
        if not self.enabled:
            return None
        allowed, tokens_text, retry_ms = await self._script(
            keys=[self._bucket(subject)], args=[self.rate_per_s, self.burst, cost, "1" if look_only else "0"]
        )
        tokens = float(tokens_text)
        return RateDecision(
            allowed=bool(allowed),
            limit=self.burst,
            remaining=max(0, math.floor(tokens)),
            reset_s=math.ceil((self.burst - tokens) / self.rate_per_s),
            retry_after_s=max(1, math.ceil(int(retry_ms) / 1000)) if not allowed else 0,
            window_s=max(1, math.ceil(self.burst / self.rate_per_s)),
        )

    async def hit(self, key_id: str, cost: int = 1) -> RateDecision | None:
        """Take `cost` tokens from `key_id`'s bucket; raises `RateLimited` when it is empty.
        Returns None when rate limiting is off."""
        decision = await self.decide(key_id, cost)
        if decision is not None and not decision.allowed:
            raise RateLimited(
                f"Too many requests for this API key; retry in {decision.retry_after_s} s.",
                retry_after_s=decision.retry_after_s,
                headers=decision.headers(),
            )
        return decision


class AuthFailures:
    """Failed authentications (no key, an unknown or revoked one) per client address: each takes
    a token; an address whose bucket is empty gets 429 before its key is even looked up, until
    the bucket refills. Behind a proxy the address is the client's only when the server trusts
    the proxy's forwarded headers (uvicorn's `--forwarded-allow-ips`)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, rate_per_s: float, burst: int) -> None:
        self._bucket = TokenBucketLimiter(redis, keys, rate_per_s=rate_per_s, burst=burst, bucket=keys.auth_failures)

    async def check(self, address: str) -> None:
        """Raise `RateLimited` when `address` has used up its failed attempts."""
        decision = await self._bucket.decide(address, look_only=True)
        if decision is not None and not decision.allowed:
            raise RateLimited(
                f"Too many requests without a valid API key from this address; retry in {decision.retry_after_s} s.",
                retry_after_s=decision.retry_after_s,
                code="too_many_failed_authentications",
                headers=decision.headers(),
            )

    async def record(self, address: str) -> None:
        """Count one failed authentication of `address`."""
        await self._bucket.decide(address)
