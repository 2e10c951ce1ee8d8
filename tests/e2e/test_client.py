"""The Python client (clients/python, `svd_serve_client`) against a live `svd-serve api` +
`worker`: sync and async, typed errors, SSE resume after a dropped connection, the
Idempotency-Key reused on a retried submit, and a tampered download detected."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

import pytest

from svd_serve_client import (
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ChecksumMismatch,
    Client,
    ConflictError,
    Event,
    JobFailed,
    NotFoundError,
    RateLimitError,
)
from tests.e2e.conftest import E2E_KEYS, Stack
from tests.e2e.cutting_proxy import Seen, cutting_proxy
from tests.media_checks import ffprobe_video

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"
SMALL = {"num_frames": 4, "num_inference_steps": 2, "width": 128, "height": 64}


def test_sync_run_events_and_verified_download(e2e_stack: Stack, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Key and URL from the environment, as a backend would configure it.
    monkeypatch.setenv("SVD_SERVE_URL", e2e_stack.base_url)
    monkeypatch.setenv("SVD_SERVE_API_KEY", e2e_stack.api_key)
    seen: list[Event] = []
    with Client() as client:
        info = client.run(SAMPLE, seed=11, cache=False, on_event=seen.append, timeout=300, **SMALL)
        assert info.status == "completed" and info.progress == 1.0
        assert set(info.checksums) >= {"mp4", "thumbnail"}
        types = [e.type for e in seen]
        assert types[-1] == "completed" and "progress" in types
        assert len({e.id for e in seen}) == len(seen)

        video = client.download(info, tmp_path / "out.mp4")
        assert hashlib.sha256(video.read_bytes()).hexdigest() == info.checksums["mp4"]
        assert int(ffprobe_video(video)["nb_frames"]) == 4
        thumb = client.job(info.id).download(tmp_path, output="thumbnail")  # a directory: <id>.jpg
        assert thumb == tmp_path / f"{info.id}.jpg" and thumb.read_bytes()[:3] == b"\xff\xd8\xff"

        assert info.id in [j.id for j in client.list(limit=50).jobs]
        assert client.status(info.id).checksums == info.checksums
        with pytest.raises(ConflictError) as ended:
            client.cancel(info.id)
        assert ended.value.status_code == 409


async def test_async_submit_cancel_retry(e2e_stack: Stack, tmp_path: Path) -> None:
    async with AsyncClient(e2e_stack.base_url, e2e_stack.api_key) as client:
        # A long job holds the single dispatcher slot, so the second waits in the queue.
        slow = await client.submit(SAMPLE, num_frames=16, num_inference_steps=50, width=256, height=256)
        queued = await client.submit(SAMPLE, priority="low", **SMALL)
        canceled = await queued.cancel()
        assert canceled.status == "canceled"
        with pytest.raises(JobFailed) as failed:
            await queued.wait(timeout=60)
        assert failed.value.job.status == "canceled"
        await slow.cancel()

        again = await queued.retry()
        assert again.id != queued.id
        events = [e async for e in again.events()]
        assert events[-1].type == "completed" and len({e.id for e in events}) == len(events)
        info = await again.wait(timeout=60)
        assert info.retry_of == queued.id and info.status == "completed"
        path = await again.download(tmp_path / "retried.mp4")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == info.checksums["mp4"]
        listed = [j.id async for j in client.iter_jobs(status="completed", page_size=2)]
        assert again.id in listed


def assert_resumed(connections: list[Seen], events: list[Event]) -> None:
    assert len(connections) >= 2, "the stream was cut once, so the client reconnected"
    assert "last-event-id" not in connections[0].headers
    # The reconnect asked for what came after the one event that got through before the cut.
    assert connections[1].headers["last-event-id"] == events[0].id
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids) and ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))
    assert events[-1].type == "completed"


async def test_events_resume_after_a_dropped_connection(e2e_stack: Stack) -> None:
    import asyncio

    with cutting_proxy(e2e_stack.base_url) as proxy:
        with Client(proxy.url, e2e_stack.api_key) as client:
            proxy.cut_events = 1
            job = client.submit(SAMPLE, seed=12, cache=False, **SMALL)
            events = await asyncio.to_thread(lambda: list(job.events()))
        assert_resumed(proxy.requests("GET", f"/{job.id}/events"), events)

        # The async client, on the ended job's stream (replayed from the start), cut the same way.
        proxy.seen.clear()
        proxy.cut_events = 1
        async with AsyncClient(proxy.url, e2e_stack.api_key) as aclient:
            replayed = [e async for e in aclient.events(job.id)]
        assert_resumed(proxy.requests("GET", f"/{job.id}/events"), replayed)
        assert [e.id for e in replayed] == [e.id for e in events]


def test_a_retried_submit_reuses_its_idempotency_key(e2e_stack: Stack) -> None:
    with cutting_proxy(e2e_stack.base_url) as proxy, Client(proxy.url, e2e_stack.api_key) as client:
        proxy.drop_submits = 1  # the service accepts the job, the answer is lost on the way
        job = client.submit(SAMPLE, seed=13, **SMALL)
        info = job.wait(timeout=300)
    posts = proxy.requests("POST", "/api/v1/animate-image")
    assert len(posts) == 2 and posts[0].status == 202 and posts[1].status == 200
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"] == job.idempotency_key
    assert f'"jobId":"{job.id}"' in posts[0].body.decode().replace(" ", "")  # one job, not two
    assert info.status == "completed"


def test_typed_errors_carry_the_problem_code(e2e_stack: Stack) -> None:
    with Client(e2e_stack.base_url, "not-a-key", max_retries=0) as client:
        with pytest.raises(AuthenticationError) as unauthorized:
            client.list()
    assert unauthorized.value.status_code == 401 and unauthorized.value.code == "invalid_api_key"

    with Client(e2e_stack.base_url, e2e_stack.api_key, max_retries=0) as client:
        with pytest.raises(NotFoundError) as missing:
            client.status("0" * 32)
        assert missing.value.code == "not_found" and missing.value.request_id
        with pytest.raises(BadRequestError) as invalid:
            client.submit(SAMPLE, seed=-1)
        assert invalid.value.status_code == 422 and invalid.value.code == "invalid_input" and "seed" in invalid.value.detail
        with pytest.raises(BadRequestError) as unknown:
            client.submit(SAMPLE, model="no-such-model")
        assert unknown.value.code == "unknown_model"

    # `bob` spends his own bucket (burst 50 at 10/s): the 429 says when to come back.
    with Client(e2e_stack.base_url, E2E_KEYS["bob"], max_retries=0) as client:
        with pytest.raises(RateLimitError) as limited:
            for _ in range(500):
                client.list(limit=1)
    assert limited.value.code == "rate_limited" and limited.value.retry_after is not None
    assert limited.value.retry_after > 0

    # With retries, the client waits out Retry-After and then succeeds.
    with Client(e2e_stack.base_url, E2E_KEYS["bob"], max_retries=3) as client:
        assert client.list(limit=1).jobs is not None


def test_a_tampered_download_is_refused(e2e_stack: Stack, tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config

    with Client(e2e_stack.base_url, e2e_stack.api_key) as client:
        info = client.run(SAMPLE, seed=14, cache=False, timeout=300, **SMALL)
        bucket = e2e_stack.env["SVD_SERVE_S3_BUCKET"]
        path = urlparse(info.outputs["mp4"]).path
        assert path.startswith(f"/{bucket}/"), path
        s3 = boto3.session.Session().client(
            "s3", endpoint_url=e2e_stack.env["SVD_SERVE_S3_ENDPOINT_URL"],
            region_name=e2e_stack.env["SVD_SERVE_S3_REGION"],
            aws_access_key_id=e2e_stack.env["SVD_SERVE_S3_ACCESS_KEY_ID"],
            aws_secret_access_key=e2e_stack.env["SVD_SERVE_S3_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )
        s3.put_object(Bucket=bucket, Key=path.split("/", 2)[2], Body=b"not the video the job made")
        dest = tmp_path / "tampered.mp4"
        with pytest.raises(ChecksumMismatch) as mismatch:
            client.download(info.id, dest)
    assert mismatch.value.expected == info.checksums["mp4"]
    assert mismatch.value.actual == hashlib.sha256(b"not the video the job made").hexdigest()
    assert not dest.exists() and not list(tmp_path.iterdir()), "nothing unverified is left behind"


async def test_wait_gives_up_at_its_timeout(e2e_stack: Stack) -> None:
    """A job that never moves (a row no queue holds: its event stream carries heartbeats only)
    ends `wait()` at its timeout with JobTimeout, sync and async, and `watch` with exit 7."""
    import asyncio
    import os
    import subprocess
    import sys

    from serving.db.engine import make_engine, make_session_factory
    from serving.db.jobs import JobRepository
    from svd_serve_client import JobTimeout
    from tests.serving.events_helpers import new_job

    engine = make_engine(e2e_stack.env["SVD_SERVE_DATABASE_URL"])
    try:
        job_id = await new_job(JobRepository(make_session_factory(engine)), "alice")
        with Client(e2e_stack.base_url, e2e_stack.api_key) as client, pytest.raises(JobTimeout):
            await asyncio.to_thread(client.wait, job_id, timeout=1)
        async with AsyncClient(e2e_stack.base_url, e2e_stack.api_key) as aclient:
            with pytest.raises(JobTimeout):
                await aclient.wait(job_id, timeout=1)
            env = {**os.environ, "SVD_SERVE_URL": e2e_stack.base_url, "SVD_SERVE_API_KEY": e2e_stack.api_key}
            watched = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "serving.cli", "watch", job_id, "--timeout", "1"],
                env=env, capture_output=True, text=True, timeout=120,
            )
            assert watched.returncode == 7 and watched.stdout == "" and "still queued" in watched.stderr
            assert (await aclient.status(job_id)).status == "queued"  # the job itself goes on
            assert (await aclient.cancel(job_id)).status == "canceled"
    finally:
        await engine.dispose()
