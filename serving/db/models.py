"""The `jobs` table as a typed SQLAlchemy model; `serving/migrations` creates exactly this."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint/index names, so migrations can refer to them on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL (indexable, compact), plain JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp that is always stored in UTC and always read back tz-aware.

    SQLite keeps no offset, so without this a value would come back naive; normalising to UTC
    on the way in also keeps SQLite's text timestamps correctly ordered for cursor paging.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC timestamp column")
        return value.astimezone(dt.timezone.utc)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    """One image-to-video job: the system of record for its status, progress and outputs."""

    __tablename__ = "jobs"
    __table_args__ = (
        # Idempotency-Key is scoped to its owner; NULL keys never collide (both databases).
        UniqueConstraint("owner_id", "idempotency_key"),
        Index(None, "owner_id", "status"),
        # Keyset paging of an owner's jobs, newest first.
        Index(None, "owner_id", "created_at", "id"),
        Index(None, "input_hash"),
        # Per-owner monthly cost totals (issue #6).
        Index(None, "owner_id", "completed_at"),
        # The dead-letter view: failed jobs, newest first.
        Index(None, "status", "created_at"),
    )

    # Native uuid on PostgreSQL, CHAR(32) on SQLite; Python sees the canonical string.
    id: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(128))
    prompt: Mapped[str | None] = mapped_column(Text)
    image_url: Mapped[str] = mapped_column(Text)  # storage URI of the input image
    status: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(32), server_default=text("'local'"))
    provider_job_id: Mapped[str | None] = mapped_column(String(128))
    result_url: Mapped[str | None] = mapped_column(Text)  # storage URI; the API presigns it
    thumbnail_url: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    model: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(8), server_default=text("'normal'"))
    progress: Mapped[float] = mapped_column(Float, server_default=text("0"))
    stage: Mapped[str] = mapped_column(String(32), server_default=text("'queued'"))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    input_hash: Mapped[str | None] = mapped_column(String(128))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, float]] = mapped_column(JSONType)  # stage -> seconds
    gpu_seconds: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    # Every stored output by kind ("mp4", "webm", ...): StoredObject.to_json(), sha256 included.
    outputs: Mapped[dict[str, Any]] = mapped_column(JSONType, server_default=text("'{}'"))
    # Completed from the result cache: `cached_from` is the job whose outputs it shares.
    cached: Mapped[bool] = mapped_column(Boolean, server_default=false())
    cached_from: Mapped[str | None] = mapped_column(Uuid(as_uuid=False))
    # Issue #5: SHA-256 of the request behind `idempotency_key` (a repeat must match it), and the
    # failed job that this one re-runs (`POST .../{id}/retry`).
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64))
    retry_of: Mapped[str | None] = mapped_column(Uuid(as_uuid=False))
    # Issue #6: the provider the client asked for (local|runway|auto), why the job went to
    # `provider`, and the provider's credits behind `cost_usd` (None for GPU-priced jobs).
    requested_provider: Mapped[str] = mapped_column(String(16), server_default=text("'auto'"))
    routing_reason: Mapped[str | None] = mapped_column(String(64))
    provider_credits: Mapped[float | None] = mapped_column(Float)


class ApiKey(Base):
    """An API key. Only the SHA-256 of the key is stored; `prefix` (in the key itself) finds the
    row, the hash proves the key. Revoked keys stay for the audit trail."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("prefix"), Index(None, "owner_id"))

    id: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64))  # hex SHA-256 of the whole key
    owner_id: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated: submit,read,admin
    name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """One outbound webhook message (its `id` is the `webhook-id` every attempt repeats)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # One message per job and event type, however often the job ran (exactly one outcome).
        UniqueConstraint("job_id", "event_type"),
        # The sweep that re-schedules pending deliveries Redis may have lost.
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(Uuid(as_uuid=False), ForeignKey("jobs.id", ondelete="CASCADE"))
    owner_id: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body that is signed and sent
    status: Mapped[str] = mapped_column(String(16))  # pending|succeeded|failed|disabled
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    round_attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))  # since the last replay
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: what the receiver answered and how long it took."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "number"),)

    id: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    number: Mapped[int] = mapped_column(Integer)  # 1-based over the delivery's whole life
    attempted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))  # succeeded|retry|failed|disabled


class WebhookEndpoint(Base):
    """A receiver URL of one owner that answered 410 Gone: nothing more is sent there."""

    __tablename__ = "webhook_endpoints"

    owner_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of `url`
    url: Mapped[str] = mapped_column(Text)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


def new_job_id() -> str:
    """A fresh job id in the canonical form the store uses."""
    return str(uuid.uuid4())


class SchemaCompatibility(Base):
    """One row: the oldest code revision that still works with the schema as migrated now.

    `svd-serve migrate` writes it from the head migration's `oldest_compatible_revision`, so a
    process of an older release (which does not know the newer migrations) can tell whether it
    may keep running on this database (docs/migrations.md)."""

    __tablename__ = "schema_compatibility"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # always 1
    oldest_code_revision: Mapped[str] = mapped_column(String(32))
