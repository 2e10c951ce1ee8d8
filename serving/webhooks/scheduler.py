"""When each pending delivery is due: a Redis sorted set (score = due time in ms).

Claiming is one script that takes the due members and pushes their score out by a lease, so
several delivery loops (one per Dispatcher replica) never send the same delivery at once, and a
loop that dies mid-attempt only delays it: the lease runs out and the delivery is due again.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from serving.keys import Keys

_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = 1, #due do
  redis.call('ZADD', KEYS[1], ARGV[3], due[i])
end
return due
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class DueDeliveries:
    """The sorted set of delivery ids by due time."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self._redis = client
        self._key = keys.webhooks_due()
        self._claim = client.register_script(_CLAIM)

    async def schedule(self, delivery_id: str, at_s: float, *, only_new: bool = False) -> None:
        """Make `delivery_id` due at unix time `at_s`; `only_new` leaves a scheduled (or
        claimed) one as it is."""
        await self._redis.zadd(self._key, {delivery_id: _ms(at_s)}, nx=only_new)

    async def claim(self, limit: int, lease_s: float, now_s: float | None = None) -> list[str]:
        """Up to `limit` due deliveries, each held for `lease_s` (its score moves past the lease)."""
        now = time.time() if now_s is None else now_s
        ids = await self._claim(keys=[self._key], args=[_ms(now), limit, _ms(now + lease_s)])
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def done(self, delivery_id: str) -> None:
        await self._redis.zrem(self._key, delivery_id)

    async def when(self, delivery_id: str) -> float | None:
        """When the delivery is due (unix seconds), None if it is not scheduled."""
        score = await self._redis.zscore(self._key, delivery_id)
        return None if score is None else score / 1000
