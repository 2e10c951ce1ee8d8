"""Rate limits and quotas on real Redis and real databases: 429 with Retry-After and RateLimit-*
headers, nothing stored for a refused submission, and atomic counting under concurrency."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from serving.db.migrate import upgrade
from serving.errors import RateLimited
from serving.keys import Keys
from serving.security.quotas import QuotaLimits, Quotas
from serving.security.rate_limits import TokenBucketLimiter
from serving.security.scopes import Scope
from serving.types import JobStatus
from tests.serving.test_api_keys import app_settings, png_bytes, running_app, submit


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def assert_429(response: httpx.Response, code: str) -> int:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["retryAfter"] == int(response.headers["retry-after"])
    assert int(response.headers["ratelimit-remaining"]) == 0
    assert int(response.headers["ratelimit-limit"]) > 0 and int(response.headers["ratelimit-reset"]) > 0
    return int(response.headers["retry-after"])


async def test_token_bucket_per_key(sqlite_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> None:
    settings = app_settings(sqlite_url, redis_url, unique_prefix, tmp_path, rate_limit_per_s=0.001, rate_limit_burst=3)
    async with running_app(settings) as app:
        key = await app.new_key("dora", Scope.READ)
        other = await app.new_key("dora", Scope.READ)
        async with app.client(key) as client, app.client(other) as second:
            remaining = []
            for _ in range(3):
                response = await client.get("/api/v1/animate-image")
                assert response.status_code == 200
                assert response.headers["ratelimit-limit"] == "3"
                assert response.headers["ratelimit-policy"] == "3;w=3000"
                remaining.append(int(response.headers["ratelimit-remaining"]))
            assert remaining == [2, 1, 0]
            retry_after = assert_429(await client.get("/api/v1/animate-image"), "rate_limited")
            assert 900 <= retry_after <= 1000  # one token at 0.001/s
            # Every route that needs a key counts, and the problem still carries a request id.
            refused = await client.get("/api/v1/models")
            assert refused.status_code == 429 and refused.headers["x-request-id"]
            # The bucket is the key's, not the owner's: the owner's other key is unaffected.
            assert (await second.get("/api/v1/animate-image")).status_code == 200
        async with app.client() as anonymous:  # probes never count
            for _ in range(5):
                assert (await anonymous.get("/healthz")).status_code == 200


async def test_failed_authentications_are_limited_per_address(
    sqlite_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    """Invalid keys from one address: 401 for the burst, then 429 before any key is looked up
    (a valid key from that address too, until the bucket refills); other addresses are not
    affected, and valid requests never use up the bucket."""
    settings = app_settings(sqlite_url, redis_url, unique_prefix, tmp_path, auth_failure_rate_per_s=0.001,
                            auth_failure_burst=5)
    async with running_app(settings) as app:
        valid = await app.new_key("erin", Scope.READ)
        attacker = httpx.ASGITransport(app=app.transport.app, client=("203.0.113.7", 40000))
        bystander = httpx.ASGITransport(app=app.transport.app, client=("198.51.100.9", 40000))
        async with httpx.AsyncClient(transport=attacker, base_url="http://testserver") as mallory, \
                httpx.AsyncClient(transport=bystander, base_url="http://testserver",
                                  headers={"Authorization": f"Bearer {valid}"}) as honest:
            for _ in range(10):  # valid keys never count as failures
                assert (await honest.get("/api/v1/animate-image")).status_code == 200
            answers = [await mallory.get("/api/v1/animate-image", headers={"Authorization": f"Bearer svd_x_{n}"})
                       for n in range(8)]
            assert [a.status_code for a in answers] == [401] * 5 + [429] * 3
            assert_429(answers[-1], "too_many_failed_authentications")
            missing = await mallory.get("/api/v1/animate-image")  # no key at all: the same bucket
            assert missing.status_code == 429
            locked_out = await mallory.get("/api/v1/animate-image", headers={"Authorization": f"Bearer {valid}"})
            assert locked_out.status_code == 429
            assert (await honest.get("/api/v1/animate-image")).status_code == 200  # another address


async def test_bucket_refills_at_the_configured_rate(redis: aioredis.Redis, unique_prefix: str) -> None:
    limiter = TokenBucketLimiter(redis, Keys(unique_prefix), rate_per_s=20, burst=1)
    first = await limiter.hit("k")
    assert first is not None and first.remaining == 0
    with pytest.raises(RateLimited) as info:
        await limiter.hit("k")
    assert info.value.retry_after_s == 1 and info.value.headers["Retry-After"] == "1"
    deadline = time.monotonic() + 2
    while True:  # one token is back after ~50 ms
        try:
            await limiter.hit("k")
            break
        except RateLimited:
            assert time.monotonic() < deadline, "the bucket never refilled"
            await asyncio.sleep(0.01)
    assert 0 < await redis.pttl(Keys(unique_prefix).rate_bucket("k")) <= 1100


async def test_bucket_is_atomic_under_concurrency(redis: aioredis.Redis, unique_prefix: str) -> None:
    limiter = TokenBucketLimiter(redis, Keys(unique_prefix), rate_per_s=0.001, burst=5)
    results = await asyncio.gather(*(limiter.hit("burst") for _ in range(30)), return_exceptions=True)
    assert sum(not isinstance(r, RateLimited) for r in results) == 5
    assert sum(isinstance(r, RateLimited) for r in results) == 25
    off = TokenBucketLimiter(redis, Keys(unique_prefix), rate_per_s=0, burst=1)
    assert [await off.hit("x") for _ in range(3)] == [None, None, None]


async def test_concurrent_jobs_per_owner(sqlite_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> None:
    settings = app_settings(sqlite_url, redis_url, unique_prefix, tmp_path, max_concurrent_jobs=2)
    async with running_app(settings) as app:
        key = await app.new_key("erin")
        async with app.client(key) as client:
            first = (await submit(client)).json()["jobId"]
            assert (await submit(client)).status_code == 202
            objects = len(app.stored_objects())
            assert assert_429(await submit(client), "too_many_concurrent_jobs") == 30
            assert len(app.stored_objects()) == objects and await app.queued() == 2
            # Another owner is not held back by erin's jobs.
            async with app.client(await app.new_key("frank")) as frank:
                assert (await submit(frank)).status_code == 202
            assert (await client.delete(f"/api/v1/animate-image/{first}")).status_code == 200
            assert (await submit(client)).status_code == 202


async def test_jobs_per_day(sqlite_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> None:
    settings = app_settings(sqlite_url, redis_url, unique_prefix, tmp_path, max_jobs_per_day=2)
    async with running_app(settings) as app:
        async with app.client(await app.new_key("gina")) as client:
            headers = {"Idempotency-Key": "once"}
            files = {"image": ("a.png", png_bytes(), "image/png")}
            assert (await client.post("/api/v1/animate-image", files=files, headers=headers)).status_code == 202
            # A repeat of the same Idempotency-Key and a refused submission cost nothing.
            assert (await client.post("/api/v1/animate-image", files=files, headers=headers)).status_code == 200
            bad = await client.post("/api/v1/animate-image", files={"image": ("a.png", b"nope", "image/png")})
            assert bad.status_code == 422
            assert await app.services.security.quotas.jobs_today("gina") == 1
            assert (await submit(client)).status_code == 202
            retry_after = assert_429(await submit(client), "daily_quota_exceeded")
            now = dt.datetime.now(dt.timezone.utc)
            midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc)
            assert abs(retry_after - (midnight - now).total_seconds()) < 60
            assert await app.services.security.quotas.jobs_today("gina") == 2
            assert await app.queued() == 2


async def test_daily_reservations_are_atomic(redis: aioredis.Redis, unique_prefix: str, tmp_path: Path) -> None:
    quotas = Quotas(redis, Keys(unique_prefix), None, QuotaLimits(max_jobs_per_day=3))  # type: ignore[arg-type]
    results = await asyncio.gather(*(quotas.reserve_job("hank") for _ in range(12)), return_exceptions=True)
    granted = [r for r in results if not isinstance(r, BaseException)]
    assert len(granted) == 3 and all(isinstance(r, RateLimited) for r in results if isinstance(r, BaseException))
    await granted[0].release()
    await granted[0].release()  # at most once
    assert await quotas.jobs_today("hank") == 2
    ttl = await redis.ttl(Keys(unique_prefix).jobs_per_day("hank", dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")))
    assert 0 < ttl <= 2 * 24 * 3600


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
async def test_gpu_seconds_per_month(
    backend: str, request: pytest.FixtureRequest, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    url = request.getfixturevalue("pg_database_url") if backend == "postgresql" else request.getfixturevalue("sqlite_url")
    upgrade(url)
    owner = f"ivy-{unique_prefix}"
    settings = app_settings(url, redis_url, unique_prefix, tmp_path, max_gpu_seconds_per_month=10)
    async with running_app(settings) as app:
        async with app.client(await app.new_key(owner)) as client:
            job_id = (await submit(client)).json()["jobId"]
            jobs = app.services.jobs
            await jobs.transition(job_id, JobStatus.PROCESSING)
            await jobs.transition(job_id, JobStatus.COMPLETED, gpu_seconds=6.0)
            assert (await submit(client)).status_code == 202  # 6 of 10 used
            second = (await client.get("/api/v1/animate-image")).json()["jobs"][0]["jobId"]
            await jobs.transition(second, JobStatus.PROCESSING)
            await jobs.transition(second, JobStatus.COMPLETED, gpu_seconds=4.5)
            retry_after = assert_429(await submit(client), "gpu_quota_exceeded")
            assert 0 < retry_after <= 31 * 24 * 3600
            assert await app.services.security.quotas.gpu_seconds_since(owner, dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)) == 10.5
