"""The optional `budget.threshold` webhook: signed like every webhook we send (Standard Webhooks),
posted to `SVD_SERVE_BUDGET_WEBHOOK_URL` the first time in a UTC month that an owner's committed
spending reaches the soft limit, and again when it reaches the budget.

Sent in the background when a submission crosses the level (once per owner, level and month; a
failed send is tried again by the next submission that crosses it), so it needs no outbox and the
submission, which holds its owner's budget lock, never waits on the receiver.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import httpx
import redis.asyncio as aioredis
import structlog

from serving import strict_json
from serving.cost import BudgetLevel, month_start
from serving.keys import Keys
from serving.settings import Settings
from serving.webhooks.signing import WebhookSigner, parse_secrets
from serving.webhooks.urlpolicy import webhook_client

log = structlog.get_logger(__name__)

EVENT_TYPE = "budget.threshold"
# How long a month's "sent" mark is kept: past the month's end, whatever day it was set.
SENT_MARK_TTL_S = 32 * 24 * 3600


class BudgetWebhook:
    """Posts one signed `budget.threshold` message per owner, level and month."""

    def __init__(
        self, url: str, signer: WebhookSigner, http: httpx.AsyncClient, redis: aioredis.Redis, keys: Keys
    ) -> None:
        self._url = url
        self._signer = signer
        self._http = http
        self._redis = redis
        self._keys = keys
        self._sending: set[asyncio.Task[None]] = set()  # sends under way (kept referenced)

    async def threshold_reached(
        self, owner_id: str, level: BudgetLevel, *, committed_usd: float, budget_usd: float
    ) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        month = month_start(now).strftime("%Y-%m")
        mark = self._keys.budget_alert(owner_id, month, level.value)
        if not await self._redis.set(mark, "1", nx=True, ex=SENT_MARK_TTL_S):
            return  # sent already this month
        message_id = f"msg_{uuid.uuid4().hex}"
        body = strict_json.dumps({
            "type": EVENT_TYPE,
            "timestamp": now.isoformat(),
            "data": {
                "ownerId": owner_id,
                "level": level.value,
                "month": month,
                "committedUsd": round(committed_usd, 6),
                "budgetUsd": budget_usd,
            },
        })
        headers = {**self._signer.headers(message_id, body, now), "content-type": "application/json"}
        task = asyncio.create_task(self._send(mark, body, headers), name=f"budget-webhook-{owner_id}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, mark: str, body: str, headers: dict[str, str]) -> None:
        try:
            response = await self._http.post(self._url, content=body, headers=headers)
            response.raise_for_status()
        except Exception as exc:  # logged, never raised: nobody awaits this task
            await self._redis.delete(mark)  # the next crossing submission tries again
            log.warning("budget_webhook_failed", mark=mark, error=repr(exc))
            return
        log.info("budget_webhook_sent", mark=mark)

    async def settle(self) -> None:
        """Wait for the sends under way (at shutdown, and in tests)."""
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def aclose(self) -> None:
        await self.settle()
        await self._http.aclose()


def build_budget_webhook(settings: Settings, redis: aioredis.Redis, keys: Keys) -> BudgetWebhook | None:
    """The webhook when `budget_webhook_url` is set (signed with SVD_SERVE_WEBHOOK_SECRETS)."""
    if not settings.budget_webhook_url:
        return None
    secrets = parse_secrets(settings.webhook_secrets)
    if not secrets:
        raise RuntimeError("SVD_SERVE_BUDGET_WEBHOOK_URL is set but SVD_SERVE_WEBHOOK_SECRETS is empty: "
                           "the budget.threshold webhook could not be signed.")
    return BudgetWebhook(settings.budget_webhook_url, WebhookSigner(secrets), webhook_client(settings), redis, keys)
