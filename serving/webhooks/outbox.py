"""A job's end becomes exactly one webhook delivery: recorded in the DB, scheduled in Redis.

`WebhookOutbox` is a `JobEventSink`: the runner and the ingress call it after every status change
and it acts on terminal ones of jobs with a `webhookUrl`. It never sends anything itself, so a
receiver that hangs or fails cannot delay a job; the delivery loop sends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog

from serving import strict_json
from serving.db.jobs import JobRecord, JobRepository
from serving.storage import ObjectStorage
from serving.types import JobStatus
from serving.uris import key_from_uri
from serving.webhooks.scheduler import DueDeliveries
from serving.webhooks.store import DeliveryRecord, WebhookStore

log = structlog.get_logger(__name__)

# Standard Webhooks event types, `<group>.<event>`.
EVENT_TYPES: Final = {
    JobStatus.COMPLETED: "job.completed",
    JobStatus.ERROR: "job.failed",
    JobStatus.CANCELED: "job.canceled",
}

UrlSigner = Callable[[str], Awaitable[str]]  # storage URI -> a download URL

# How far back the sweep looks for jobs that ended without their webhook recorded, and how long
# it leaves a job that just ended to the process that ended it.
RECOVERY_WINDOW = dt.timedelta(hours=24)
RECOVERY_SETTLE = dt.timedelta(seconds=30)


def storage_url_signer(storage: ObjectStorage, ttl_s: int) -> UrlSigner:
    """Download URLs for the payload, valid `ttl_s` (receivers re-read `statusUrl` for fresh ones)."""

    async def sign(uri: str) -> str:
        return await asyncio.to_thread(storage.url, key_from_uri(uri), ttl_s)

    return sign


class WebhookOutbox:
    """Turns terminal job states into pending deliveries (one per job and event type)."""

    def __init__(
        self,
        store: WebhookStore,
        due: DueDeliveries,
        *,
        public_base_url: str,
        sign_url: UrlSigner | None,
        jobs: JobRepository | None = None,
        url_ttl_s: float | None = None,
    ) -> None:
        self._store = store
        self._due = due
        self._base = public_base_url.rstrip("/")
        self._sign_url = sign_url
        # To sign a completed job's links again for a late retry (None: never re-signed).
        self._jobs = jobs
        self._url_ttl_s = url_ttl_s

    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None:
        if not record.status.terminal or not record.webhook_url:
            return
        try:
            await self.enqueue(record)
        except Exception as exc:
            log.error("webhook_enqueue_failed", job_id=record.id, error=repr(exc))

    async def enqueue(self, record: JobRecord) -> DeliveryRecord:
        """Record the job's outcome webhook (or find the one already recorded) and make it due."""
        if not record.status.terminal or not record.webhook_url:
            raise ValueError(f"job {record.id} has no outcome to announce")
        event_type = EVENT_TYPES[record.status]
        body = strict_json.dumps(await self.payload(record, event_type))  # receivers parse strictly
        delivery, created = await self._store.create(
            job_id=record.id, owner_id=record.owner_id, url=record.webhook_url, event_type=event_type, payload=body
        )
        if created:
            await self._due.schedule(delivery.id, time.time())
            log.info("webhook_enqueued", job_id=record.id, delivery_id=delivery.id, event_type=event_type)
        return delivery

    async def recover_unannounced(self, settle: dt.timedelta = RECOVERY_SETTLE) -> int:
        """Record the outcome webhook of jobs that ended without one in the last
        `RECOVERY_WINDOW` (their process died between the status change and this outbox).
        Jobs that ended less than `settle` ago are left to the process that ended them. Returns how many
        were recovered; run by the delivery loop's sweep."""
        if self._jobs is None:
            return 0
        now = dt.datetime.now(dt.timezone.utc)
        job_ids = await self._store.unannounced_jobs(ended_after=now - RECOVERY_WINDOW,
                                                     ended_before=now - settle)
        for job_id in job_ids:
            record = await self._jobs.get(job_id)
            if record is not None and record.status.terminal and record.webhook_url:
                await self.enqueue(record)
                log.warning("webhook_recovered", job_id=job_id, status=record.status.value)
        return len(job_ids)

    async def body_for_attempt(self, delivery: DeliveryRecord) -> str:
        """What an attempt of `delivery` sends: the recorded body, byte for byte, while its
        download links have more than half their lifetime left; after that (a retry 30 minutes
        or hours later) the same message with the links signed again, so that no attempt hands
        the receiver links that have expired. The webhook-id never changes."""
        if (
            delivery.event_type != EVENT_TYPES[JobStatus.COMPLETED]
            or self._jobs is None
            or self._url_ttl_s is None
            or dt.datetime.now(dt.timezone.utc) - delivery.created_at < dt.timedelta(seconds=self._url_ttl_s / 2)
        ):
            return delivery.payload
        record = await self._jobs.get(delivery.job_id)
        if record is None:
            return delivery.payload
        body = json.loads(delivery.payload)
        body["data"].update(await self._download_urls(record))
        return strict_json.dumps(body)

    async def _download_urls(self, record: JobRecord) -> dict[str, str | None]:
        urls: dict[str, str | None] = {"resultUrl": None, "thumbnailUrl": None}
        if self._sign_url is not None and record.status is JobStatus.COMPLETED:
            if record.result_url:
                urls["resultUrl"] = await self._sign_url(record.result_url)
            if record.thumbnail_url:
                urls["thumbnailUrl"] = await self._sign_url(record.thumbnail_url)
        return urls

    async def payload(self, record: JobRecord, event_type: str) -> dict[str, Any]:
        urls = await self._download_urls(record)
        error = {"code": record.error_code, "message": record.error_message or ""} if record.error_code else None
        if record.status is not JobStatus.ERROR:
            error = None  # a retried attempt's error does not belong to a completed job
        return {
            "type": event_type,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(),
            "data": {
                "jobId": record.id,
                "status": record.status.value,
                "statusUrl": f"{self._base}/api/v1/animate-image/status/{record.id}",
                "eventsUrl": f"{self._base}/api/v1/animate-image/{record.id}/events",
                **urls,
                "error": error,
                "attempts": record.attempts,
                "completedAt": record.completed_at.isoformat() if record.completed_at else None,
                "metadata": record.metadata,
            },
        }
