"""Outbound webhook attempts and given-up deliveries, counted for the ingress's /metrics."""

from __future__ import annotations

import redis.asyncio as aioredis

from serving.keys import Keys
from serving.metrics import WEBHOOK_ATTEMPT_SECONDS, WEBHOOK_ATTEMPTS, WEBHOOK_FAILURES, MetricBatch

# How a final outcome is named in svd_webhook_delivery_failures_total{reason}
_GAVE_UP = {"failed": "exhausted", "disabled": "gone"}


class WebhookMetrics:
    """Told of every attempt by the DeliveryWorker (`outcome` is an AttemptOutcome value)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def attempt(self, outcome: str, latency_s: float) -> None:
        batch = MetricBatch(self._keys)
        batch.inc(WEBHOOK_ATTEMPTS, {"outcome": outcome})
        batch.observe(WEBHOOK_ATTEMPT_SECONDS, {}, latency_s)
        if outcome in _GAVE_UP:
            batch.inc(WEBHOOK_FAILURES, {"reason": _GAVE_UP[outcome]})
        await batch.aflush(self._redis)
