"""Webhook deliveries of a job (log and replay) and inbound provider callbacks."""

from __future__ import annotations

import time
from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.errors import NotFound, PayloadTooLarge
from serving.ingress.deps import JobIdPath, OwnerDep, Services, ServicesDep, SubmitOwnerDep
from serving.ingress.routes_events import delivery_of
from serving.ingress.schemas import ApiModel
from serving.webhooks.store import AttemptRecord, DeliveryRecord

router = APIRouter(prefix="/api/v1/animate-image", tags=["webhooks"])
provider_router = APIRouter(prefix="/api/v1/provider/webhook", tags=["providers"])

# Provider callbacks are small JSON documents; anything far larger is not one.
MAX_INBOUND_BYTES = 1024 * 1024


class WebhookAttemptView(ApiModel):
    number: int
    attempted_at: datetime
    status_code: int | None
    latency_ms: float | None
    error: str | None
    outcome: str


class WebhookDeliveryView(ApiModel):
    delivery_id: str  # the `webhook-id` header of every attempt
    event_type: str
    url: str
    status: str  # pending | succeeded | failed | disabled
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    attempt_log: list[WebhookAttemptView]


class WebhookDeliveryList(ApiModel):
    deliveries: list[WebhookDeliveryView]


class ProviderWebhookAnswer(ApiModel):
    status: str  # processed | duplicate
    delivery_id: str


def _view(delivery: DeliveryRecord, attempts: list[AttemptRecord]) -> WebhookDeliveryView:
    return WebhookDeliveryView(
        delivery_id=delivery.id,
        event_type=delivery.event_type,
        url=delivery.url,
        status=delivery.status.value,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_status_code=delivery.last_status_code,
        last_error=delivery.last_error,
        created_at=delivery.created_at,
        delivered_at=delivery.delivered_at,
        attempt_log=[
            WebhookAttemptView(
                number=a.number,
                attempted_at=a.attempted_at,
                status_code=a.status_code,
                latency_ms=a.latency_ms,
                error=a.error,
                outcome=a.outcome.value,
            )
            for a in attempts
        ],
    )


async def _check_owner(services: Services, job_id: str, owner: str) -> str:
    return (await services.jobs.owned(job_id, owner)).id


@router.get("/{job_id}/webhooks", operation_id="listWebhookDeliveries", response_model=WebhookDeliveryList, response_model_by_alias=True)
async def list_deliveries(job_id: JobIdPath, services: ServicesDep, owner: OwnerDep) -> WebhookDeliveryList:
    """Every webhook delivery of the job with each attempt (status code, latency, error)."""
    canonical = await _check_owner(services, job_id, owner)
    pairs = await delivery_of(services).webhooks.list_for_job(canonical)
    return WebhookDeliveryList(deliveries=[_view(d, a) for d, a in pairs])


@router.post("/{job_id}/webhooks/{delivery_id}/replay", operation_id="replayWebhookDelivery", status_code=202, response_model=WebhookDeliveryView,
             response_model_by_alias=True)
async def replay_delivery(
    job_id: JobIdPath, delivery_id: str, services: ServicesDep, owner: SubmitOwnerDep
) -> JSONResponse:
    """Send a delivery again now, with the same `webhook-id` and a fresh retry schedule; an
    endpoint disabled by 410 Gone is enabled again."""
    canonical = await _check_owner(services, job_id, owner)
    webhooks = delivery_of(services)
    existing = await webhooks.webhooks.get(delivery_id)
    if existing is None or existing.job_id != canonical:
        raise NotFound(f"Webhook delivery {delivery_id[:64]} was not found.")
    delivery = await webhooks.webhooks.replay(delivery_id)
    await webhooks.due.schedule(delivery.id, time.time())
    attempts = await webhooks.webhooks.attempts(delivery.id)
    body = _view(delivery, attempts).model_dump(mode="json", by_alias=True)
    return JSONResponse(body, status_code=202)


@provider_router.post("/{provider}", operation_id="receiveProviderWebhook", response_model=ProviderWebhookAnswer, response_model_by_alias=True)
async def provider_webhook(provider: str, request: Request, services: ServicesDep) -> ProviderWebhookAnswer:
    """A provider's callback. Authenticated by its signature (or the per-job token in the URL),
    not by an API key; 401 and no change when that fails, 200 `duplicate` for a repeat."""
    declared = request.headers.get("content-length", "")
    too_large = PayloadTooLarge(f"A provider webhook body may have at most {MAX_INBOUND_BYTES} bytes.")
    if declared.isdigit() and int(declared) > MAX_INBOUND_BYTES:
        raise too_large
    body = await request.body()  # the raw bytes: the signature covers them exactly
    if len(body) > MAX_INBOUND_BYTES:
        raise too_large
    result = await delivery_of(services).inbound.receive(provider, request.headers, body, request.query_params)
    return ProviderWebhookAnswer(status=result.status, delivery_id=result.delivery_id)
