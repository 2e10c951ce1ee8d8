"""Idempotency-Key, retries of failed jobs and the dead-letter view (issue #5), on a real ingress
over ASGI with real Redis and real PostgreSQL/SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serving.errors import Conflict
from serving.ingress.idempotency import IdempotencyGuard
from serving.security.scopes import Scope
from serving.types import JobStatus
from tests.serving.test_api_keys import App, app_settings, png_bytes, running_app

pytestmark = pytest.mark.asyncio

SUBMIT = "/api/v1/animate-image"


@pytest.fixture
async def app(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[App]:
    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path)
    async with running_app(settings) as running:
        yield running


async def post(client: httpx.AsyncClient, key: str, **data: str) -> httpx.Response:
    return await client.post(SUBMIT, files={"image": ("a.png", png_bytes(), "image/png")}, data=data,
                             headers={"Idempotency-Key": key})


async def test_same_body_same_job_other_body_422(app: App, unique_prefix: str) -> None:
    owner = f"ida-{unique_prefix}"
    async with app.client(await app.new_key(owner)) as client:
        first = await post(client, "order-1", prompt="a cat", numFrames="4")
        assert first.status_code == 202, first.text
        again = await post(client, "order-1", prompt="a cat", numFrames="4")
        assert again.status_code == 200 and again.json()["jobId"] == first.json()["jobId"]
        objects = len(app.stored_objects())
        other = await post(client, "order-1", prompt="a dog", numFrames="4")
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused", other.text
        # A refused repeat leaves nothing behind, and the key stays with the first job.
        assert len(app.stored_objects()) == objects and await app.queued() == 1
        records, _ = await app.services.jobs.list_for_owner(owner)
        assert [r.id for r in records] == [first.json()["jobId"]]


async def test_concurrent_duplicates_make_one_job(app: App, unique_prefix: str) -> None:
    """Fault test 7: 20 concurrent clients, one Idempotency-Key -> one job."""
    owner = f"ivy-{unique_prefix}"
    key = await app.new_key(owner)
    clients = [app.client(key) for _ in range(20)]
    try:
        answers = await asyncio.gather(*(post(c, "burst", prompt="same") for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 202, 409}, [a.text for a in answers]
    assert codes.count(202) == 1
    assert all(a.json()["code"] == "idempotency_key_in_flight" for a in answers if a.status_code == 409)
    job_ids = {a.json()["jobId"] for a in answers if a.status_code in (200, 202)}
    assert len(job_ids) == 1
    records, _ = await app.services.jobs.list_for_owner(owner)
    assert [r.id for r in records] == list(job_ids)
    assert await app.queued() == 1 and len(app.stored_objects()) == 1


async def test_in_flight_marker_answers_409(app: App, unique_prefix: str) -> None:
    owner = f"ina-{unique_prefix}"
    async with app.client(await app.new_key(owner)) as client:
        marker = app.services.keys.idempotency_lock(owner, "held")
        # What a request of another ingress replica holds while it stores the image and the row.
        await app.services.redis.set(marker, "1", ex=60)
        try:
            held = await post(client, "held")
        finally:
            await app.services.redis.delete(marker)
        assert held.status_code == 409 and held.json()["code"] == "idempotency_key_in_flight"
        assert await app.queued() == 0 and app.stored_objects() == []
        assert (await post(client, "held")).status_code == 202


async def test_in_flight_marker_is_renewed_while_held_and_lapses_after_a_crash(app: App, unique_prefix: str) -> None:
    """The marker is a short lease renewed while the request is accepted: a slow acceptance keeps
    its key, and an ingress that dies holding one blocks the key only until the lease lapses."""
    owner = f"inr-{unique_prefix}"
    redis, keys = app.services.redis, app.services.keys
    guard = IdempotencyGuard(app.services.jobs, redis, keys, 3600, in_flight_ttl_s=0.3)
    async with guard.in_flight(owner, "slow"):
        await asyncio.sleep(1.0)  # more than three leases
        with pytest.raises(Conflict):
            async with guard.in_flight(owner, "slow"):
                pass
    assert not await redis.exists(keys.idempotency_lock(owner, "slow"))  # released at the end

    # An ingress killed mid-acceptance: its marker stays, no renewal, no release.
    crashed = redis.lock(keys.idempotency_lock(owner, "crash"), timeout=0.3)
    assert await crashed.acquire(blocking=False)
    with pytest.raises(Conflict):
        async with guard.in_flight(owner, "crash"):
            pass
    await asyncio.sleep(0.5)
    async with guard.in_flight(owner, "crash"):
        assert await redis.exists(keys.idempotency_lock(owner, "crash"))


async def test_key_expires_after_retention(database_url: str, redis_url: str, unique_prefix: str,
                                           tmp_path: Path) -> None:
    settings = app_settings(database_url, redis_url, unique_prefix, tmp_path, idempotency_ttl_s=0)
    owner = f"iko-{unique_prefix}"
    async with running_app(settings) as app, app.client(await app.new_key(owner)) as client:
        first = await post(client, "old")
        # Past its retention the key names nothing: a new request (even another body) is new.
        second = await post(client, "old", prompt="new body")
        assert first.status_code == second.status_code == 202
        assert first.json()["jobId"] != second.json()["jobId"]
        old = await app.services.jobs.get(first.json()["jobId"])
        assert old is not None and old.idempotency_key is None


async def fail(app: App, job_id: str) -> None:
    """The job ran out of attempts, as the dispatcher records it."""
    await app.services.jobs.transition(job_id, JobStatus.PROCESSING, attempts=3)
    await app.services.jobs.transition(job_id, JobStatus.ERROR, error_code="generation_failed",
                                       error_message="Failed after 3 attempts: worker lost")
    await app.services.queue.remove(job_id)


async def test_retry_and_dead_letter_view(app: App, unique_prefix: str) -> None:
    owner = f"ira-{unique_prefix}"
    admin_key = await app.new_key(f"ops-{unique_prefix}", Scope.ADMIN)
    async with app.client(await app.new_key(owner)) as client, app.client(admin_key) as admin:
        accepted = await client.post(SUBMIT, files={"image": ("a.png", png_bytes(), "image/png")},
                                     data={"prompt": "poison", "priority": "high"})
        job_id = accepted.json()["jobId"]
        queued_retry = await client.post(f"{SUBMIT}/{job_id}/retry")
        assert queued_retry.status_code == 409 and queued_retry.json()["code"] == "job_not_retryable"
        await fail(app, job_id)

        assert (await client.get("/api/v1/admin/dead-letter")).status_code == 403
        letters = (await admin.get("/api/v1/admin/dead-letter", params={"owner": owner})).json()
        assert [j["jobId"] for j in letters["jobs"]] == [job_id]
        entry = letters["jobs"][0]
        assert entry["ownerId"] == owner and entry["attempts"] == 3
        assert entry["error"] == {"code": "generation_failed", "message": "Failed after 3 attempts: worker lost"}

        retried = await client.post(f"{SUBMIT}/{job_id}/retry")
        assert retried.status_code == 202, retried.text
        new_id = retried.json()["jobId"]
        assert new_id != job_id and retried.json()["status"] == "queued"
        status = (await client.get(f"/api/v1/animate-image/status/{new_id}")).json()
        assert status["retryOf"] == job_id and status["prompt"] == "poison"
        assert status["queuePosition"] == 0
        assert await app.services.queue.position(new_id) == 0
        # The original keeps its one outcome.
        original = (await client.get(f"/api/v1/animate-image/status/{job_id}")).json()
        assert original["status"] == "error"

        # Paging: two dead letters, one per page.
        await fail(app, new_id)
        page = (await admin.get("/api/v1/admin/dead-letter", params={"owner": owner, "limit": 1})).json()
        assert [j["jobId"] for j in page["jobs"]] == [new_id] and page["jobs"][0]["retryOf"] == job_id
        rest = (await admin.get("/api/v1/admin/dead-letter",
                                params={"owner": owner, "limit": 1, "cursor": page["nextCursor"]})).json()
        assert [j["jobId"] for j in rest["jobs"]] == [job_id] and rest["nextCursor"] is None
