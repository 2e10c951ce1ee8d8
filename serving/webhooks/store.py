"""Delivery records: every outbound webhook, each of its attempts, and endpoints that said 410.

The database is the system of record for deliveries (Redis only says when each is due next), so
a lost Redis loses no webhook: the delivery loop re-schedules pending rows from here.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import RowMapping, Table, exists, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from serving.db.engine import rows_matched
from serving.db.models import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from serving.errors import NotFound
from serving.types import TERMINAL_STATUS_VALUES

deliveries = cast(Table, WebhookDelivery.__table__)
attempts_table = cast(Table, WebhookAttempt.__table__)
endpoints = cast(Table, WebhookEndpoint.__table__)
jobs_table = cast(Table, Job.__table__)

# A job that ends is rarely older than this (queued, retried): the unannounced-jobs scan only
# looks at jobs created within it.
UNANNOUNCED_MAX_JOB_AGE = dt.timedelta(days=7)

_ERROR_MAX = 2000


class DeliveryStatus(str, enum.Enum):
    PENDING = "pending"  # waiting for its next attempt
    SUCCEEDED = "succeeded"  # a receiver answered 2xx
    FAILED = "failed"  # the schedule ran out
    DISABLED = "disabled"  # the endpoint answered 410 Gone (now or for an earlier delivery)


class AttemptOutcome(str, enum.Enum):
    SUCCEEDED = "succeeded"
    RETRY = "retry"  # failed; another attempt is scheduled
    FAILED = "failed"  # failed and it was the last one
    DISABLED = "disabled"  # 410 Gone


@dataclass(frozen=True)
class AttemptRecord:
    """One HTTP attempt of a delivery."""

    number: int
    attempted_at: dt.datetime
    status_code: int | None
    latency_ms: float | None
    error: str | None
    outcome: AttemptOutcome


@dataclass(frozen=True)
class DeliveryRecord:
    """A detached snapshot of one webhook_deliveries row."""

    id: str
    job_id: str
    owner_id: str
    url: str
    event_type: str
    payload: str
    status: DeliveryStatus
    attempts: int
    round_attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    delivered_at: dt.datetime | None


def new_message_id() -> str:
    """A `webhook-id`: unique per message, repeated by every attempt of it."""
    return f"msg_{uuid.uuid4().hex}"


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class WebhookStore:
    """Async access to the webhook tables, one short transaction per call."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(
        self, *, job_id: str, owner_id: str, url: str, event_type: str, payload: str
    ) -> tuple[DeliveryRecord, bool]:
        """Record a new pending delivery, due now. Returns (delivery, created); a job's second
        delivery of the same event type returns the first one (one webhook per outcome)."""
        now = _now()
        values: dict[str, Any] = {
            "id": new_message_id(),
            "job_id": job_id,
            "owner_id": owner_id,
            "url": url,
            "event_type": event_type,
            "payload": payload,
            "status": DeliveryStatus.PENDING.value,
            "attempts": 0,
            "round_attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        try:
            async with self._sessions() as session, session.begin():
                row = (await session.execute(insert(deliveries).values(values).returning(deliveries))).mappings().one()
            return _delivery(row), True
        except IntegrityError:
            stmt = select(deliveries).where(deliveries.c.job_id == job_id, deliveries.c.event_type == event_type)
            async with self._sessions() as session:
                existing = (await session.execute(stmt)).mappings().first()
            if existing is None:
                raise  # not the uniqueness race: the job row is missing (foreign key)
            return _delivery(existing), False

    async def get(self, delivery_id: str) -> DeliveryRecord | None:
        async with self._sessions() as session:
            row = (await session.execute(select(deliveries).where(deliveries.c.id == delivery_id))).mappings().first()
        return None if row is None else _delivery(row)

    async def list_for_job(self, job_id: str) -> list[tuple[DeliveryRecord, list[AttemptRecord]]]:
        """The job's deliveries, oldest first, each with its attempts in order."""
        async with self._sessions() as session:
            rows = (
                await session.execute(
                    select(deliveries).where(deliveries.c.job_id == job_id).order_by(deliveries.c.created_at)
                )
            ).mappings().all()
            ids = [row["id"] for row in rows]
            attempt_rows = (
                (
                    await session.execute(
                        select(attempts_table)
                        .where(attempts_table.c.delivery_id.in_(ids))
                        .order_by(attempts_table.c.number)
                    )
                ).mappings().all()
                if ids
                else []
            )
        by_delivery: dict[str, list[AttemptRecord]] = {i: [] for i in ids}
        for row in attempt_rows:
            by_delivery[row["delivery_id"]].append(_attempt(row))
        return [(_delivery(row), by_delivery[row["id"]]) for row in rows]

    async def attempts(self, delivery_id: str) -> list[AttemptRecord]:
        stmt = select(attempts_table).where(attempts_table.c.delivery_id == delivery_id).order_by(attempts_table.c.number)
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).mappings().all()
        return [_attempt(row) for row in rows]

    async def record_attempt(
        self,
        delivery: DeliveryRecord,
        *,
        attempted_at: dt.datetime,
        status_code: int | None,
        latency_ms: float | None,
        error: str | None,
        outcome: AttemptOutcome,
        next_attempt_at: dt.datetime | None,
    ) -> DeliveryRecord:
        """Store one attempt and move the delivery on (to its next attempt or its end)."""
        number = delivery.attempts + 1
        status = {
            AttemptOutcome.SUCCEEDED: DeliveryStatus.SUCCEEDED,
            AttemptOutcome.RETRY: DeliveryStatus.PENDING,
            AttemptOutcome.FAILED: DeliveryStatus.FAILED,
            AttemptOutcome.DISABLED: DeliveryStatus.DISABLED,
        }[outcome]
        error = error[:_ERROR_MAX] if error else None
        now = _now()
        changes: dict[str, Any] = {
            "status": status.value,
            "attempts": number,
            "round_attempts": delivery.round_attempts + 1,
            "next_attempt_at": next_attempt_at,
            "last_status_code": status_code,
            "last_error": error,
            "updated_at": now,
        }
        if outcome is AttemptOutcome.SUCCEEDED:
            changes["delivered_at"] = now
        async with self._sessions() as session, session.begin():
            await session.execute(
                insert(attempts_table).values(
                    id=str(uuid.uuid4()),
                    delivery_id=delivery.id,
                    number=number,
                    attempted_at=attempted_at,
                    status_code=status_code,
                    latency_ms=latency_ms,
                    error=error,
                    outcome=outcome.value,
                )
            )
            row = (
                await session.execute(
                    update(deliveries).where(deliveries.c.id == delivery.id).values(changes).returning(deliveries)
                )
            ).mappings().one()
        return _delivery(row)

    async def mark_disabled(self, delivery_id: str, reason: str) -> None:
        """End a delivery without an attempt: its endpoint is disabled."""
        stmt = (
            update(deliveries)
            .where(deliveries.c.id == delivery_id)
            .values(status=DeliveryStatus.DISABLED.value, next_attempt_at=None, last_error=reason, updated_at=_now())
        )
        async with self._sessions() as session, session.begin():
            await session.execute(stmt)

    async def replay(self, delivery_id: str) -> DeliveryRecord:
        """Make a delivery pending again, due now, with a fresh retry schedule (same message id);
        its endpoint is enabled again: asking for a replay says the receiver is back."""
        now = _now()
        async with self._sessions() as session, session.begin():
            row = (
                await session.execute(
                    update(deliveries)
                    .where(deliveries.c.id == delivery_id)
                    .values(
                        status=DeliveryStatus.PENDING.value,
                        round_attempts=0,
                        next_attempt_at=now,
                        updated_at=now,
                    )
                    .returning(deliveries)
                )
            ).mappings().first()
            if row is None:
                raise NotFound(f"Webhook delivery {delivery_id} was not found.")
            await session.execute(
                update(endpoints)
                .where(endpoints.c.owner_id == row["owner_id"], endpoints.c.url_hash == url_hash(row["url"]))
                .values(disabled_at=None, disabled_reason=None, updated_at=now)
            )
        return _delivery(row)

    async def is_disabled(self, owner_id: str, url: str) -> bool:
        stmt = select(endpoints.c.disabled_at).where(
            endpoints.c.owner_id == owner_id, endpoints.c.url_hash == url_hash(url)
        )
        async with self._sessions() as session:
            disabled_at = await session.scalar(stmt)
        return disabled_at is not None

    async def disable_endpoint(self, owner_id: str, url: str, reason: str) -> None:
        """Stop sending to `url` for `owner_id` (it answered 410 Gone)."""
        now = _now()
        values = {"disabled_at": now, "disabled_reason": reason[:_ERROR_MAX], "updated_at": now}
        key = (endpoints.c.owner_id == owner_id, endpoints.c.url_hash == url_hash(url))
        for _ in range(2):  # an insert that loses a race to another replica becomes an update
            try:
                async with self._sessions() as session, session.begin():
                    result = await session.execute(update(endpoints).where(*key).values(values))
                    if not rows_matched(result):
                        await session.execute(
                            insert(endpoints).values(owner_id=owner_id, url_hash=url_hash(url), url=url, **values)
                        )
                return
            except IntegrityError:
                continue

    async def due_pending(self, limit: int = 500) -> list[tuple[str, dt.datetime]]:
        """Pending deliveries and when each is due, soonest first (to re-seed the scheduler)."""
        stmt = (
            select(deliveries.c.id, deliveries.c.next_attempt_at)
            .where(deliveries.c.status == DeliveryStatus.PENDING.value)
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit)
        )
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).all()
        return [(row[0], row[1] or _now()) for row in rows]


    async def unannounced_jobs(
        self, *, ended_after: dt.datetime, ended_before: dt.datetime, limit: int = 100
    ) -> list[str]:
        """Jobs that ended in the window with a webhook URL but no delivery recorded: the process
        that ended them died between the status change and the outbox (an ingress killed right
        after a cancel). `created_at` bounds the scan so that it can use the jobs index."""
        stmt = (
            select(jobs_table.c.id)
            .where(
                jobs_table.c.status.in_(TERMINAL_STATUS_VALUES),
                jobs_table.c.created_at >= ended_after - UNANNOUNCED_MAX_JOB_AGE,
                jobs_table.c.updated_at >= ended_after,
                jobs_table.c.updated_at < ended_before,
                jobs_table.c.webhook_url.is_not(None),
                ~exists().where(deliveries.c.job_id == jobs_table.c.id),
            )
            .limit(limit)
        )
        async with self._sessions() as session:
            return [str(row[0]) for row in (await session.execute(stmt)).all()]


def _delivery(row: RowMapping) -> DeliveryRecord:
    return DeliveryRecord(
        id=row["id"],
        job_id=str(row["job_id"]),
        owner_id=row["owner_id"],
        url=row["url"],
        event_type=row["event_type"],
        payload=row["payload"],
        status=DeliveryStatus(row["status"]),
        attempts=row["attempts"],
        round_attempts=row["round_attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        delivered_at=row["delivered_at"],
    )


def _attempt(row: RowMapping) -> AttemptRecord:
    return AttemptRecord(
        number=row["number"],
        attempted_at=row["attempted_at"],
        status_code=row["status_code"],
        latency_ms=row["latency_ms"],
        error=row["error"],
        outcome=AttemptOutcome(row["outcome"]),
    )
