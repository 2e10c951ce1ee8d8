"""The job store on real PostgreSQL and SQLite: migrations, the schema check, the repository and
the guarded status transitions (including a cancel-vs-complete race)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from serving.db.engine import async_database_url, make_engine, make_session_factory
from serving.db.errors import DatabaseNotMigrated, DuplicateIdempotencyKey
from serving.db.jobs import JobRecord, JobRepository
from serving.db.migrate import check_migrated, current_revision, head_revision, upgrade
from serving.db.models import Base
from serving.errors import InvalidInput, InvalidTransition, NotFound, SvdServeError
from serving.types import ALLOWED_TRANSITIONS, JobStatus, Priority, Stage
from tests.serving.db_fixtures import BACKENDS, fresh_pg_database, sqlite_url

# Fixtures --------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A never-migrated database; the SQLite file sits in a directory that does not exist yet."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "not-yet" / "jobs.db")
    else:
        with fresh_pg_database() as url:
            yield url


@pytest.fixture(scope="session")
def migrated_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = sqlite_url(tmp_path_factory.mktemp("jobs-db") / "jobs.db")
    upgrade(url)
    return url


@pytest.fixture(params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest) -> str:
    name = "migrated_pg" if request.param == "postgresql" else "migrated_sqlite_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def repo(migrated_url: str) -> AsyncIterator[JobRepository]:
    engine = make_engine(migrated_url)
    try:
        yield JobRepository(make_session_factory(engine))
    finally:
        await engine.dispose()


@pytest.fixture
def owner() -> str:
    """An owner no other test uses, so tests sharing a database cannot see each other's jobs."""
    return f"owner-{uuid.uuid4().hex[:12]}"


async def new_job(repo: JobRepository, owner: str, **kwargs: Any) -> JobRecord:
    values: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "owner_id": owner,
        "image_url": "s3://svd/inputs/a.png",
        "params": {"width": 64, "height": 64, "num_frames": 4},
        "model": "tiny-random",
        "priority": Priority.NORMAL,
    }
    values.update(kwargs)
    return await repo.create(**values)


# Paths of allowed moves that bring a fresh (queued) job to each status.
PATH_TO: dict[JobStatus, list[JobStatus]] = {
    JobStatus.QUEUED: [],
    JobStatus.PROCESSING: [JobStatus.PROCESSING],
    JobStatus.COMPLETED: [JobStatus.PROCESSING, JobStatus.COMPLETED],
    JobStatus.ERROR: [JobStatus.PROCESSING, JobStatus.ERROR],
    JobStatus.CANCELED: [JobStatus.CANCELED],
}
ALLOWED = [(src, dst) for src, dsts in ALLOWED_TRANSITIONS.items() for dst in sorted(dsts)]
DISALLOWED = [
    (src, dst)
    for src, dst in itertools.product(JobStatus, JobStatus)
    if dst not in ALLOWED_TRANSITIONS[src]
]


# The race is decided by timing, so run it often enough for both orders to win at times.
RACE_ROUNDS = 12


async def job_in(repo: JobRepository, owner: str, status: JobStatus) -> JobRecord:
    job = await new_job(repo, owner)
    for step in PATH_TO[status]:
        job = await repo.transition(job.id, step)
    assert job.status is status
    return job


# Migrations and the start-up check ---------------------------------------------------------------


def test_upgrade_from_empty_to_head(empty_db_url: str) -> None:
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision() is not None
    upgrade(empty_db_url)  # idempotent: a second `svd-serve migrate` changes nothing
    assert current_revision(empty_db_url) == head_revision()


async def test_check_refuses_unmigrated_database_then_passes(empty_db_url: str) -> None:
    with pytest.raises(DatabaseNotMigrated) as refused:
        await check_migrated(empty_db_url)
    error = refused.value
    assert isinstance(error, SvdServeError)
    assert error.code == "database_not_migrated"
    assert error.message == (
        f"The database is empty (no migrations applied) while this code needs revision "
        f"{head_revision()}; run `svd-serve migrate` to upgrade it."
    )

    upgrade(empty_db_url)  # from inside a running event loop: runs in a helper thread
    await check_migrated(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        await check_migrated(engine)
    finally:
        await engine.dispose()


async def test_check_names_the_revision_of_an_outdated_database(empty_db_url: str) -> None:
    upgrade(empty_db_url, "0006")  # a revision this code knows is older than it needs
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(DatabaseNotMigrated, match="is at revision 0006 while this code needs"):
            await check_migrated(engine)
    finally:
        await engine.dispose()


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_match_the_model(empty_db_url: str) -> None:
    upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
            # The comparison is live: a schema that drifts from the model is reported.
            await conn.execute(text("DROP INDEX ix_jobs_input_hash"))
            diff = await conn.run_sync(_schema_diff)
            await conn.rollback()
        assert [d[0] for d in diff] == ["add_index"]
    finally:
        await engine.dispose()


async def test_sqlite_engine_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "pragmas.db"))
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 10_000
    finally:
        await engine.dispose()


def test_async_database_url_adds_async_drivers() -> None:
    assert async_database_url("postgresql://u:p%40ss@h/db") == "postgresql+asyncpg://u:p%40ss@h/db"
    assert async_database_url("sqlite:////x/y.db") == "sqlite+aiosqlite:////x/y.db"
    assert async_database_url("postgresql+asyncpg://h/db") == "postgresql+asyncpg://h/db"


# Create / get ------------------------------------------------------------------------------------


async def test_create_then_get(repo: JobRepository, owner: str) -> None:
    created = await new_job(
        repo,
        owner,
        prompt="a cat",
        metadata={"campaign": "x", "n": 1},
        webhook_url="https://client.example/hook",
        input_hash="abc123",
        priority="high",
        max_attempts=5,
    )
    assert created.status is JobStatus.QUEUED
    assert created.stage == Stage.QUEUED
    assert created.progress == 0.0
    assert created.attempts == 0 and created.max_attempts == 5
    assert created.priority is Priority.HIGH
    assert created.provider == "local"
    assert created.metadata == {"campaign": "x", "n": 1}
    assert created.timings == {}
    assert created.started_at is None and created.completed_at is None
    assert created.created_at.tzinfo is not None
    assert created.created_at == created.updated_at

    assert await repo.get(created.id) == created
    assert await repo.get(created.id, owner_id=owner) == created
    assert await repo.get(uuid.UUID(created.id)) == created


async def test_get_hides_other_owners_and_tolerates_bad_ids(
    repo: JobRepository, owner: str
) -> None:
    job = await new_job(repo, owner)
    assert await repo.get(job.id, owner_id=f"{owner}-other") is None
    assert await repo.get(str(uuid.uuid4())) is None
    for bad in ("not-a-uuid", "", "1; DROP TABLE jobs", job.id + "0"):
        assert await repo.get(bad) is None
        assert await repo.get(bad, owner_id=owner) is None


async def test_delete_removes_the_job(repo: JobRepository, owner: str) -> None:
    job = await new_job(repo, owner)
    await repo.delete(job.id)
    assert await repo.get(job.id) is None
    await repo.delete(job.id)  # already gone: nothing to do
    await repo.delete("garbage")


# Idempotency keys ------------------------------------------------------------------------------


async def test_idempotency_key_is_unique_per_owner(repo: JobRepository, owner: str) -> None:
    first = await new_job(repo, owner, idempotency_key="key-1")
    with pytest.raises(DuplicateIdempotencyKey) as duplicate:
        await new_job(repo, owner, idempotency_key="key-1")
    assert duplicate.value.existing == first
    assert duplicate.value.code == "idempotency_key_conflict"

    other = await new_job(repo, f"{owner}-b", idempotency_key="key-1")
    assert other.id != first.id
    assert await repo.find_by_idempotency_key(owner, "key-1") == first
    assert await repo.find_by_idempotency_key(f"{owner}-b", "key-1") == other
    assert await repo.find_by_idempotency_key(owner, "key-2") is None
    # Jobs without a key never collide with each other.
    await new_job(repo, owner)
    await new_job(repo, owner)


async def test_racing_creates_with_one_key_leave_one_job(repo: JobRepository, owner: str) -> None:
    results = await asyncio.gather(
        *(new_job(repo, owner, idempotency_key="same") for _ in range(4)), return_exceptions=True
    )
    created = [r for r in results if isinstance(r, JobRecord)]
    losers = [r for r in results if not isinstance(r, JobRecord)]
    assert len(created) == 1
    assert all(isinstance(e, DuplicateIdempotencyKey) for e in losers)
    assert all(
        isinstance(e, DuplicateIdempotencyKey) and e.existing.id == created[0].id for e in losers
    )


# Listing ---------------------------------------------------------------------------------------


async def test_list_pages_newest_first_with_a_cursor(repo: JobRepository, owner: str) -> None:
    jobs = [await new_job(repo, owner) for _ in range(7)]
    await new_job(repo, f"{owner}-other")  # never listed for `owner`
    expected = [j.id for j in sorted(jobs, key=lambda j: (j.created_at, j.id), reverse=True)]
    assert expected[0] == jobs[-1].id  # created last, listed first

    seen: list[str] = []
    pages: list[int] = []
    cursor: str | None = None
    while True:
        page, cursor = await repo.list_for_owner(owner, limit=3, cursor=cursor)
        pages.append(len(page))
        seen.extend(j.id for j in page)
        if cursor is None:
            break
    assert pages == [3, 3, 1]
    assert seen == expected  # newest first, nothing twice, nothing missing


async def test_list_filters_by_status(repo: JobRepository, owner: str) -> None:
    done = await job_in(repo, owner, JobStatus.COMPLETED)
    await job_in(repo, owner, JobStatus.QUEUED)
    page, cursor = await repo.list_for_owner(owner, status=JobStatus.COMPLETED)
    assert [j.id for j in page] == [done.id] and cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!!",
        "",
        base64.urlsafe_b64encode(b"yesterday|nope").decode(),
        base64.urlsafe_b64encode(f"2025-01-01T00:00:00|{uuid.uuid4()}".encode()).decode(),
    ],
)
async def test_list_refuses_a_bad_cursor(repo: JobRepository, owner: str, cursor: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        await repo.list_for_owner(owner, cursor=cursor)
    assert refused.value.code == "invalid_cursor"


async def test_list_refuses_a_bad_limit(repo: JobRepository, owner: str) -> None:
    with pytest.raises(InvalidInput):
        await repo.list_for_owner(owner, limit=0)


# Transitions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), ALLOWED, ids=lambda s: s.value)
async def test_every_allowed_transition(
    repo: JobRepository, owner: str, src: JobStatus, dst: JobStatus
) -> None:
    before = await job_in(repo, owner, src)
    after = await repo.transition(before.id, dst)
    assert after.status is dst
    assert await repo.get(before.id) == after
    assert after.updated_at >= before.updated_at
    if dst is JobStatus.PROCESSING:
        assert after.started_at is not None
    if dst.terminal:
        assert after.completed_at is not None and after.completed_at >= after.created_at
    else:
        assert after.completed_at is None


@pytest.mark.parametrize(("src", "dst"), DISALLOWED, ids=lambda s: s.value)
async def test_every_disallowed_transition_is_refused(
    repo: JobRepository, owner: str, src: JobStatus, dst: JobStatus
) -> None:
    before = await job_in(repo, owner, src)
    with pytest.raises(InvalidTransition) as refused:
        await repo.transition(before.id, dst, progress=0.5, result_url="s3://x")
    assert f"from {src.value} to {dst.value}" in refused.value.message
    assert await repo.get(before.id) == before


async def test_transition_of_a_missing_job(repo: JobRepository) -> None:
    with pytest.raises(NotFound):
        await repo.transition(str(uuid.uuid4()), JobStatus.PROCESSING)
    with pytest.raises(NotFound):
        await repo.transition("not-a-uuid", JobStatus.CANCELED)


async def test_transition_sets_fields(repo: JobRepository, owner: str) -> None:
    job = await new_job(repo, owner)
    running = await repo.transition(
        job.id, JobStatus.PROCESSING, attempts=1, stage=Stage.LOADING, progress=0.1
    )
    assert (running.attempts, running.stage, running.progress) == (1, "loading", 0.1)
    done = await repo.transition(
        job.id,
        JobStatus.COMPLETED,
        result_url="s3://svd/out/video.mp4",
        thumbnail_url="s3://svd/out/thumb.jpg",
        gpu_seconds=12.5,
        cost_usd=0.01,
        provider="runway",
        provider_job_id="rw-1",
    )
    assert done.progress == 1.0 and done.stage == Stage.DONE
    assert done.result_url == "s3://svd/out/video.mp4"
    assert done.thumbnail_url == "s3://svd/out/thumb.jpg"
    assert (done.gpu_seconds, done.cost_usd) == (12.5, 0.01)
    assert (done.provider, done.provider_job_id) == ("runway", "rw-1")
    assert done.started_at == running.started_at
    with pytest.raises(TypeError):
        await repo.transition(job.id, JobStatus.ERROR, owner_id="x")  # type: ignore[call-arg]


async def test_error_records_the_reason(repo: JobRepository, owner: str) -> None:
    job = await job_in(repo, owner, JobStatus.PROCESSING)
    failed = await repo.transition(
        job.id, JobStatus.ERROR, error_code="generation_failed", error_message="NaN latents"
    )
    assert (failed.error_code, failed.error_message) == ("generation_failed", "NaN latents")


async def test_retry_keeps_first_start_and_resets_progress(repo: JobRepository, owner: str) -> None:
    job = await new_job(repo, owner)
    first = await repo.transition(job.id, JobStatus.PROCESSING, attempts=1, progress=0.4)
    requeued = await repo.transition(job.id, JobStatus.QUEUED, error_code="retryable")
    assert (requeued.progress, requeued.stage, requeued.error_code) == (0.0, "queued", "retryable")
    second = await repo.transition(job.id, JobStatus.PROCESSING, attempts=2, error_code=None)
    assert second.started_at == first.started_at
    assert (second.attempts, second.error_code) == (2, None)


async def test_timings_are_merged(repo: JobRepository, owner: str) -> None:
    job = await new_job(repo, owner)
    await repo.transition(job.id, JobStatus.PROCESSING, timings={"queue_wait_s": 1.25})
    done = await repo.transition(
        job.id, JobStatus.COMPLETED, timings={"inference_s": 3, "queue_wait_s": 1.5}
    )
    assert done.timings == {"queue_wait_s": 1.5, "inference_s": 3.0}
    assert (await repo.get(job.id)).timings == done.timings  # type: ignore[union-attr]


async def test_cancel_racing_complete_has_one_winner(repo: JobRepository, owner: str) -> None:
    for i in range(RACE_ROUNDS):
        job = await job_in(repo, owner, JobStatus.PROCESSING)
        moves = [
            repo.transition(job.id, JobStatus.COMPLETED, result_url="s3://svd/out.mp4"),
            repo.transition(job.id, JobStatus.CANCELED),
        ]
        if i % 2:
            moves.reverse()  # neither writer always starts first
        results = await asyncio.gather(*moves, return_exceptions=True)
        winners = [r for r in results if isinstance(r, JobRecord)]
        losers = [r for r in results if not isinstance(r, JobRecord)]
        assert len(winners) == 1, results
        assert len(losers) == 1 and isinstance(losers[0], InvalidTransition), results
        stored = await repo.get(job.id)
        assert stored is not None and stored == winners[0]
        assert stored.status in (JobStatus.COMPLETED, JobStatus.CANCELED)
        assert (stored.result_url is not None) == (stored.status is JobStatus.COMPLETED)


# Progress --------------------------------------------------------------------------------------


async def test_update_progress_applies_only_to_live_jobs(repo: JobRepository, owner: str) -> None:
    job = await job_in(repo, owner, JobStatus.PROCESSING)
    assert await repo.update_progress(job.id, progress=0.5, stage=Stage.DENOISING) is True
    live = await repo.get(job.id)
    assert live is not None and (live.progress, live.stage) == (0.5, "denoising")
    assert await repo.update_progress(job.id, progress=0.6) is True
    assert (await repo.get(job.id)).stage == "denoising"  # type: ignore[union-attr]

    for status in (JobStatus.COMPLETED, JobStatus.CANCELED, JobStatus.ERROR):
        finished = await job_in(repo, owner, status)
        assert await repo.update_progress(finished.id, progress=0.3, stage="late") is False
        assert await repo.get(finished.id) == finished

    assert await repo.update_progress(str(uuid.uuid4()), progress=0.1) is False
    assert await repo.update_progress("bad-id", progress=0.1) is False


async def test_timestamps_are_utc(repo: JobRepository, owner: str) -> None:
    job = await job_in(repo, owner, JobStatus.COMPLETED)
    for stamp in (job.created_at, job.updated_at, job.started_at, job.completed_at):
        assert stamp is not None and stamp.utcoffset() == dt.timedelta(0)
