"""The jobs repository: every read and write of the `jobs` table goes through `JobRepository`.

Status changes only through `JobRepository.transition`, which enforces `ALLOWED_TRANSITIONS` with
one conditional UPDATE, so racing writers (cancel vs complete) cannot both win.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict, cast

from sqlalchemy import (
    RowMapping,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from serving.provider_names import AUTO, LOCAL

from serving.db.engine import rows_matched
from serving.db.errors import DuplicateIdempotencyKey
from serving.db.models import Job, JSONType, UTCDateTime
from serving.errors import Conflict, InvalidInput, InvalidTransition, NotFound
from serving.types import ACTIVE_STATUS_VALUES, ALLOWED_TRANSITIONS, JobParams, JobStatus, Priority, Stage

if TYPE_CHECKING:
    from typing_extensions import Unpack

jobs = cast(Table, Job.__table__)
MAX_PAGE_SIZE = 100
# A failed conditional UPDATE is re-checked; another writer may have just moved the job into a
# status we may leave. Each retry means some other transition committed, so a few suffice.
_TRANSITION_TRIES = 5


@dataclass(frozen=True)
class JobRecord:
    """A detached snapshot of one jobs row."""

    id: str
    owner_id: str
    status: JobStatus
    image_url: str
    params: dict[str, Any]
    model: str
    priority: Priority
    progress: float
    stage: str
    attempts: int
    max_attempts: int
    provider: str
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    completed_at: dt.datetime | None
    prompt: str | None
    provider_job_id: str | None
    result_url: str | None
    thumbnail_url: str | None
    metadata: dict[str, Any]
    error_code: str | None
    error_message: str | None
    idempotency_key: str | None
    input_hash: str | None
    webhook_url: str | None
    timings: dict[str, float]
    gpu_seconds: float | None
    cost_usd: float | None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> StoredObject JSON
    cached: bool = False
    cached_from: str | None = None
    idempotency_fingerprint: str | None = None  # SHA-256 of the request behind idempotency_key
    retry_of: str | None = None  # the failed job this one re-runs
    requested_provider: str = AUTO  # what the client asked for (serving.provider_names)
    routing_reason: str | None = None  # why the job went to `provider`
    provider_credits: float | None = None  # a managed provider's credits behind `cost_usd`

    @property
    def job_params(self) -> JobParams:
        return JobParams.from_json(self.params)


class JobChanges(TypedDict, total=False):
    """Columns that `JobRepository.transition` may set along with the status."""

    progress: float
    stage: Stage | str
    error_code: str | None
    error_message: str | None
    result_url: str | None
    thumbnail_url: str | None
    attempts: int
    timings: Mapping[str, float]  # merged into the stored dict
    gpu_seconds: float | None
    cost_usd: float | None
    provider: str
    provider_job_id: str | None
    outputs: dict[str, dict[str, Any]]  # replaces the stored map
    cached: bool
    cached_from: str | None
    routing_reason: str | None
    provider_credits: float | None


_CHANGEABLE = frozenset(JobChanges.__annotations__)


class JobRepository:
    """Async access to the jobs table, one short transaction per call."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def create(
        self,
        *,
        job_id: str | uuid.UUID,
        owner_id: str,
        image_url: str,
        params: dict[str, Any],
        model: str,
        priority: Priority | str,
        prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        input_hash: str | None = None,
        max_attempts: int = 3,
        idempotency_fingerprint: str | None = None,
        retry_of: str | None = None,
        requested_provider: str = AUTO,
    ) -> JobRecord:
        """Insert a queued job. Raises `DuplicateIdempotencyKey` (carrying the existing job) when
        the owner already used `idempotency_key`, `Conflict` when `job_id` exists."""
        jid = str(uuid.UUID(str(job_id)))
        now = _now()
        stmt = (
            insert(jobs)
            .values(
                {
                    "id": jid,
                    "owner_id": owner_id,
                    "prompt": prompt,
                    "image_url": image_url,
                    "status": JobStatus.QUEUED.value,
                    "provider": LOCAL,
                    "attempts": 0,
                    "max_attempts": max_attempts,
                    "created_at": now,
                    "updated_at": now,
                    "metadata": dict(metadata or {}),
                    "params": dict(params),
                    "model": model,
                    "priority": Priority(priority).value,
                    "progress": 0.0,
                    "stage": Stage.QUEUED.value,
                    "idempotency_key": idempotency_key,
                    "input_hash": input_hash,
                    "webhook_url": webhook_url,
                    "timings": {},
                    "idempotency_fingerprint": idempotency_fingerprint,
                    "retry_of": retry_of,
                    "requested_provider": requested_provider,
                }
            )
            .returning(jobs)
        )
        try:
            async with self._sessions() as session, session.begin():
                row = (await session.execute(stmt)).mappings().one()
        except IntegrityError:
            if idempotency_key is not None:
                existing = await self.find_by_idempotency_key(owner_id, idempotency_key)
                if existing is not None:
                    raise DuplicateIdempotencyKey(
                        f"Idempotency-Key {idempotency_key!r} was already used for job "
                        f"{existing.id}",
                        existing=existing,
                    ) from None
            raise Conflict(f"job {jid} already exists", code="job_exists") from None
        return _record(row)

    async def get(
        self, job_id: str | uuid.UUID, *, owner_id: str | None = None
    ) -> JobRecord | None:
        """The job, or None if missing, malformed, or (with `owner_id`) another owner's."""
        jid = _parse_id(job_id)
        if jid is None:
            return None
        stmt = select(jobs).where(jobs.c.id == jid)
        if owner_id is not None:
            stmt = stmt.where(jobs.c.owner_id == owner_id)
        async with self._sessions() as session:
            row = (await session.execute(stmt)).mappings().first()
        return None if row is None else _record(row)

    async def owned(self, job_id: str | uuid.UUID, owner_id: str | None) -> JobRecord:
        """The owner's job, or 404: another owner's job, a malformed id and a missing job all
        answer the same, so an id says nothing about jobs the caller may not see. `None`: any
        owner's (an admin's view)."""
        record = await self.get(job_id, owner_id=owner_id)
        if record is None:
            raise NotFound(f"Job {job_id} was not found.")
        return record

    async def list_for_owner(
        self,
        owner_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        status: JobStatus | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of the owner's jobs, newest first, and the cursor of the next page (or None)."""
        stmt = select(jobs).where(jobs.c.owner_id == owner_id)
        if status is not None:
            stmt = stmt.where(jobs.c.status == JobStatus(status).value)
        return await self._page(stmt, limit, cursor)

    async def _page(self, stmt: Select[Any], limit: int, cursor: str | None) -> tuple[list[JobRecord], str | None]:
        """Keyset paging, newest first: (created_at, id) is unique, so the order and the pages are
        stable while jobs are added."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidInput(
                f"limit must be between 1 and {MAX_PAGE_SIZE} but is {limit}", code="invalid_limit"
            )
        if cursor is not None:
            after_created, after_id = _decode_cursor(cursor)
            stmt = stmt.where(
                or_(
                    jobs.c.created_at < after_created,
                    and_(jobs.c.created_at == after_created, jobs.c.id < after_id),
                )
            )
        stmt = stmt.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        async with self._sessions() as session:
            rows = (await session.execute(stmt)).mappings().all()
        records = [_record(row) for row in rows[:limit]]
        return records, _encode_cursor(records[-1]) if len(rows) > limit else None

    async def transition(
        self, job_id: str | uuid.UUID, to: JobStatus, **fields: Unpack[JobChanges]
    ) -> JobRecord:
        """Move the job to `to` and set `fields`, atomically; the only way a status changes.

        Raises `InvalidTransition` for a move `ALLOWED_TRANSITIONS` refuses (the row is left as
        it was) and `NotFound` for a missing job. Sets `updated_at`, `started_at` on the first
        move to processing and `completed_at` on a terminal status. Unless `fields` say
        otherwise, completed sets progress 1 and stage "done", and back to queued (a retry)
        sets progress 0 and stage "queued".
        """
        to = JobStatus(to)
        unknown = set(fields) - _CHANGEABLE
        if unknown:
            raise TypeError(f"transition() cannot set {sorted(unknown)}")
        jid = _parse_id(job_id)
        if jid is None:
            raise NotFound(f"job {job_id} not found")
        sources = {s.value for s, targets in ALLOWED_TRANSITIONS.items() if to in targets}
        stmt = (
            update(jobs)
            .where(jobs.c.id == jid, jobs.c.status.in_(sorted(sources)))
            .values(_transition_values(to, fields))
            .returning(jobs)
        )
        current: str | None = None
        for _ in range(_TRANSITION_TRIES):
            async with self._sessions() as session, session.begin():
                row = (await session.execute(stmt)).mappings().first()
                if row is not None:
                    return _record(row)
                current = await session.scalar(select(jobs.c.status).where(jobs.c.id == jid))
            if current is None:
                raise NotFound(f"job {jid} not found")
            if current not in sources:
                break
        raise InvalidTransition(f"job {jid} cannot move from {current} to {to.value}")

    async def update_progress(
        self, job_id: str | uuid.UUID, *, progress: float, stage: Stage | str | None = None
    ) -> bool:
        """Record progress of a queued or processing job; False (nothing written) otherwise."""
        jid = _parse_id(job_id)
        if jid is None:
            return False
        values: dict[str, Any] = {"progress": _check_progress(progress), "updated_at": _now()}
        if stage is not None:
            values["stage"] = _stage_value(stage)
        stmt = update(jobs).where(jobs.c.id == jid, jobs.c.status.in_(ACTIVE_STATUS_VALUES)).values(values)
        async with self._sessions() as session, session.begin():
            result = await session.execute(stmt)
        return bool(rows_matched(result))

    async def delete(self, job_id: str | uuid.UUID) -> None:
        """Remove the job (undoing a submission that failed after the insert); missing is fine."""
        jid = _parse_id(job_id)
        if jid is None:
            return
        async with self._sessions() as session, session.begin():
            await session.execute(delete(jobs).where(jobs.c.id == jid))

    async def find_cache_source(self, owner_id: str, input_hash: str) -> JobRecord | None:
        """The owner's newest job that completed with `input_hash` by generating its outputs
        (not itself served from the cache), if any."""
        stmt = (
            select(jobs)
            .where(
                jobs.c.owner_id == owner_id,
                jobs.c.input_hash == input_hash,
                jobs.c.status == JobStatus.COMPLETED.value,
                jobs.c.cached.is_(False),
            )
            .order_by(jobs.c.completed_at.desc(), jobs.c.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            row = (await session.execute(stmt)).mappings().first()
        return None if row is None else _record(row)

    async def find_by_idempotency_key(self, owner_id: str, key: str) -> JobRecord | None:
        """The owner's job submitted with Idempotency-Key `key`, if any."""
        stmt = select(jobs).where(jobs.c.owner_id == owner_id, jobs.c.idempotency_key == key)
        async with self._sessions() as session:
            row = (await session.execute(stmt)).mappings().first()
        return None if row is None else _record(row)


    async def record_provider_task(self, job_id: str | uuid.UUID, *, provider: str, provider_job_id: str) -> bool:
        """Remember the managed provider's task of a processing job before polling it, so a
        re-run resumes that task instead of paying for a second one; False if not processing."""
        jid = _parse_id(job_id)
        if jid is None:
            return False
        values = {"provider": provider, "provider_job_id": provider_job_id, "updated_at": _now()}
        stmt = update(jobs).where(jobs.c.id == jid, jobs.c.status == JobStatus.PROCESSING.value).values(values)
        async with self._sessions() as session, session.begin():
            result = await session.execute(stmt)
        return bool(rows_matched(result))

    async def record_routing(self, job_id: str | uuid.UUID, *, provider: str, routing_reason: str) -> bool:
        """A processing job moves to another provider (a fallback mid-attempt); False if not processing."""
        jid = _parse_id(job_id)
        if jid is None:
            return False
        values = {"provider": provider, "routing_reason": routing_reason, "provider_job_id": None, "updated_at": _now()}
        stmt = update(jobs).where(jobs.c.id == jid, jobs.c.status == JobStatus.PROCESSING.value).values(values)
        async with self._sessions() as session, session.begin():
            result = await session.execute(stmt)
        return bool(rows_matched(result))

    async def release_idempotency_key(self, job_id: str | uuid.UUID) -> None:
        """Forget the job's Idempotency-Key (it has outlived its retention), so the owner may
        use the key for a new request; the job itself is unchanged."""
        jid = _parse_id(job_id)
        if jid is None:
            return
        stmt = update(jobs).where(jobs.c.id == jid).values(idempotency_key=None, idempotency_fingerprint=None)
        async with self._sessions() as session, session.begin():
            await session.execute(stmt)

    async def list_dead_letters(
        self, *, limit: int = 50, cursor: str | None = None, owner_id: str | None = None
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs that ended in `error` (attempts exhausted, poison, permanent failure), newest
        first, with the cursor of the next page; across owners unless `owner_id` is given."""
        stmt = select(jobs).where(jobs.c.status == JobStatus.ERROR.value)
        if owner_id is not None:
            stmt = stmt.where(jobs.c.owner_id == owner_id)
        return await self._page(stmt, limit, cursor)


# SQL helpers ---------------------------------------------------------------------------------


class json_merge(FunctionElement[Any]):
    """`left` with the top-level keys of the JSON object `right` added or replaced."""

    name = "json_merge"
    inherit_cache = True
    type = JSONType


@compiles(json_merge, "postgresql")
def _json_merge_pg(element: json_merge, compiler: SQLCompiler, **kw: Any) -> str:
    left, right = element.clauses
    return f"({compiler.process(left, **kw)} || {compiler.process(right, **kw)})"


@compiles(json_merge, "sqlite")
def _json_merge_sqlite(element: json_merge, compiler: SQLCompiler, **kw: Any) -> str:
    # RFC 7396 merge patch; for a flat dict of numbers it is a plain key-wise merge.
    return f"json_patch({compiler.process(element.clauses, **kw)})"


def _transition_values(to: JobStatus, fields: JobChanges) -> dict[str, Any]:
    now = _now()
    values: dict[str, Any] = {"status": to.value, "updated_at": now}
    if to is JobStatus.PROCESSING:
        # A retried job keeps the time its first attempt started.
        values["started_at"] = func.coalesce(jobs.c.started_at, literal(now, UTCDateTime()))
    if to.terminal:
        values["completed_at"] = now
    if to is JobStatus.COMPLETED:
        values.update(progress=1.0, stage=Stage.DONE.value)
    elif to is JobStatus.QUEUED:
        values.update(progress=0.0, stage=Stage.QUEUED.value)
    values.update({name: value for name, value in fields.items() if name not in _CHECKED_CHANGES})
    if "timings" in fields and (patch := _check_timings(fields["timings"])):
        values["timings"] = json_merge(jobs.c.timings, bindparam("timings_patch", patch, type_=JSONType))
    if "progress" in fields:
        values["progress"] = _check_progress(fields["progress"])
    if "stage" in fields:
        values["stage"] = _stage_value(fields["stage"])
    return values


# Changes checked or merged rather than written as given.
_CHECKED_CHANGES = frozenset({"timings", "progress", "stage"})



# Plain helpers -------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _parse_id(job_id: object) -> str | None:
    """The canonical form of a job id, None when it is not a UUID (a client typo, not a 500)."""
    try:
        return str(job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id)))
    except ValueError:
        return None


def _check_progress(progress: float) -> float:
    if math.isnan(progress):
        raise ValueError("progress is NaN")
    # Float arithmetic in step counting can overshoot by an ulp; that is not worth an error.
    return min(1.0, max(0.0, float(progress)))


def _stage_value(stage: Stage | str) -> str:
    return stage.value if isinstance(stage, Stage) else str(stage)


def _check_timings(timings: Mapping[str, float]) -> dict[str, float]:
    patch: dict[str, float] = {}
    for name, seconds in timings.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"timings[{name!r}] must be seconds as a number, not {seconds!r}")
        patch[str(name)] = float(seconds)
    return patch


def _encode_cursor(record: JobRecord) -> str:
    raw = f"{record.created_at.isoformat()}|{record.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, job_id = raw.partition("|")
        created_at = dt.datetime.fromisoformat(created)
        if created_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return created_at, str(uuid.UUID(job_id))
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidInput("cursor is not one this API returned", code="invalid_cursor") from None


def _record(row: RowMapping) -> JobRecord:
    return JobRecord(
        id=str(row["id"]),
        owner_id=row["owner_id"],
        status=JobStatus(row["status"]),
        image_url=row["image_url"],
        params=dict(row["params"] or {}),
        model=row["model"],
        priority=Priority(row["priority"]),
        progress=float(row["progress"]),
        stage=row["stage"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        provider=row["provider"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        prompt=row["prompt"],
        provider_job_id=row["provider_job_id"],
        result_url=row["result_url"],
        thumbnail_url=row["thumbnail_url"],
        metadata=dict(row["metadata"] or {}),
        error_code=row["error_code"],
        error_message=row["error_message"],
        idempotency_key=row["idempotency_key"],
        input_hash=row["input_hash"],
        webhook_url=row["webhook_url"],
        timings=dict(row["timings"] or {}),
        gpu_seconds=row["gpu_seconds"],
        cost_usd=row["cost_usd"],
        outputs=dict(row["outputs"] or {}),
        cached=bool(row["cached"]),
        cached_from=None if row["cached_from"] is None else str(row["cached_from"]),
        idempotency_fingerprint=row["idempotency_fingerprint"],
        retry_of=None if row["retry_of"] is None else str(row["retry_of"]),
        requested_provider=row["requested_provider"],
        routing_reason=row["routing_reason"],
        provider_credits=row["provider_credits"],
    )
