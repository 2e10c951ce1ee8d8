"""Fault injection on the production worker (issue #5: items 1 and 4 on the Ray path, and a
Generator replica that crashes): `svd-serve worker` processes, each with its own local Ray cluster
and the real Serve app (Dispatcher, Generator running the tiny model, PostProcessor with ffmpeg),
fed by `svd-serve api` on real Redis and PostgreSQL.

The rest of the fault suite uses a CPU stand-in for Ray so that each scenario fits in seconds;
this module checks that the same guarantees hold with Ray in the middle. Killing every process of
a worker's Ray node at once (driver, GCS, raylet, replicas) is what a lost spot node looks like."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from serving.keys import Keys
from serving.types import JobStatus
from tests.faults.conftest import FaultStack, WorkerProc

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(600)]

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"
LEASE_MS = 4000
# Many cheap steps: the first half of the denoising is a wide window for a signal on two busy
# cores, and a run still fits the suite's time three times over.
SLOW_JOB = {"numFrames": "4", "numInferenceSteps": "40", "width": "64", "height": "64"}
CATCH_ROUNDS = 3


async def submit(client: httpx.AsyncClient, webhook_url: str) -> str:
    response = await client.post(
        "/api/v1/animate-image", files={"image": ("sample.png", SAMPLE.read_bytes(), "image/png")},
        data={**SLOW_JOB, "webhookUrl": webhook_url},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["jobId"])


async def wait_denoising(redis: aioredis.Redis, keys: Keys, job_ids: list[str], worker: WorkerProc,
                         timeout_s: float = 180) -> bool:
    """Until every job has taken at least one denoising step. True when each was still in the
    first half of its steps when seen (a signal now lands mid-denoising); False when the test was
    starved so long that one had gone further."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = [await redis.hmget(keys.progress(j), "step", "steps") for j in job_ids]
        if all(step and int(step) >= 1 for step, _ in steps):
            return all(2 * int(step) <= int(total) for step, total in steps)  # type: ignore[arg-type]
        assert worker.proc.poll() is None, "".join(worker.lines[-40:])
        await asyncio.sleep(0.1)  # polling the progress hashes, bounded by the deadline
    raise TimeoutError(f"jobs never denoising: {steps}\n{''.join(worker.lines[-40:])}")


async def submit_mid_denoising(client: httpx.AsyncClient, stack: FaultStack, redis: aioredis.Redis, keys: Keys,
                               worker: WorkerProc, count: int = 1) -> list[str]:
    """Submit `count` jobs and return once all are in the first half of their denoising. Never
    assumes how fast the machine is: jobs seen too late are let finish (checked) and new ones
    submitted, a few rounds at most."""
    for _ in range(CATCH_ROUNDS):
        job_ids = [await submit(client, stack.receiver.url) for _ in range(count)]
        if await wait_denoising(redis, keys, job_ids, worker):
            return job_ids
        records = await stack.wait_terminal(job_ids, timeout_s=180)
        assert all(r.status is JobStatus.COMPLETED for r in records.values()), records
    raise AssertionError(f"no job caught in the first half of its denoising in {CATCH_ROUNDS} rounds")


def replica_pids(app: str, deployment: str = "") -> list[int]:
    """The processes of an app's replicas (of one deployment, or all). Ray titles them
    `ray::ServeReplica:<app>:<deployment>`, plus `.<method>` while one runs."""
    title = f"ray::ServeReplica:{app}:{deployment}"
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    pids = []
    for line in listing.splitlines():
        pid, _, args = line.strip().partition(" ")
        args = args.strip()
        if args == title or args.startswith(title if not deployment else title + "."):
            pids.append(int(pid))
    return pids


def kill_node(worker: WorkerProc, app: str) -> None:
    """SIGKILL every process of the worker's Ray node at once, as when a spot node disappears:
    the replicas (each in a session of its own, so named here) and the driver's process group
    (driver, GCS, raylet)."""
    for pid in replica_pids(app):
        os.kill(pid, signal.SIGKILL)
    os.killpg(worker.proc.pid, signal.SIGKILL)
    assert worker.wait(10) == -signal.SIGKILL


def kill_replica(app: str, deployment: str) -> None:
    """SIGKILL the replicas of one deployment, as a CUDA crash takes its process down."""
    pids = replica_pids(app, deployment)
    assert pids, f"no {deployment} replica of {app} running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def stored_objects(data_dir: Path, owner: str, job_id: str) -> list[str]:
    return sorted(p.name for p in data_dir.glob(f"**/objects/{owner}/{job_id}/*"))


async def test_ray_worker_killed_or_stopped_mid_job_loses_nothing(
    stack: FaultStack, redis_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    ingress = stack.start_ingress(data_dir, job_backoff_ms=200)
    keys = Keys(stack.prefix)
    redis = aioredis.Redis.from_url(redis_url)
    app = f"faults-{stack.prefix}"  # not the name another test's Ray cluster uses
    worker_settings = {"lock_duration_ms": LEASE_MS, "dispatcher_concurrency": 2, "max_batch_size": 2,
                       "drain_grace_s": 0.0, "log_level": "INFO", "serve_app_name": app}
    try:
        async with ingress.client() as client:
            # 1. Node loss mid-denoising: the job goes back after its lease lapses and completes
            # on the next worker, once, with one completion webhook and one set of objects.
            first = stack.start_ray_worker(data_dir, **worker_settings)
            (lost,) = await submit_mid_denoising(client, stack, redis, keys, first)
            kill_node(first, app)
            second = stack.start_ray_worker(data_dir, **worker_settings)
            records = await stack.wait_terminal([lost], timeout_s=180)
            assert records[lost].status is JobStatus.COMPLETED, records[lost]
            assert records[lost].attempts == 2
            webhooks = await stack.wait_webhooks(lost, 1, timeout_s=20)
            assert {kind for _, kind in webhooks} == {"job.completed"} and len(webhooks) == 1
            assert stored_objects(data_dir, stack.owner, lost) == ["input.png", "thumbnail.jpg", "video.mp4"]
            status = (await client.get(f"/api/v1/animate-image/status/{lost}")).json()
            assert status["status"] == "completed" and status["resultUrl"]

            # 4. SIGTERM with two jobs in hand, far from done: both go back to the queue at once
            # (long before their lease could lapse) and the next worker completes them.
            in_hand = await submit_mid_denoising(client, stack, redis, keys, second, count=2)
            second.signal(signal.SIGTERM)
            assert second.wait(60) == 0, "".join(second.lines[-40:])
            for job_id in in_hand:
                record = await stack.jobs.get(job_id)
                assert record is not None and record.status is JobStatus.QUEUED, record
                assert record.stage == "requeued", record
                # The Generator dropped the run instead of finishing it for nobody.
                assert any("generation_abandoned" in line and job_id in line for line in second.lines), job_id
            # Back in the queue now, not after a lease lapse: no other worker runs to notice one.
            assert all([await stack.queue.position(job_id) is not None for job_id in in_hand])

            third = stack.start_ray_worker(data_dir, **worker_settings)
            records = await stack.wait_terminal(in_hand, timeout_s=180)
            for job_id in in_hand:
                assert records[job_id].status is JobStatus.COMPLETED, records[job_id]
                assert records[job_id].attempts == 2
                webhooks = await stack.wait_webhooks(job_id, 1, timeout_s=20)
                assert {kind for _, kind in webhooks} == {"job.completed"} and len(webhooks) == 1

            # A Generator replica dies mid-job, its worker lives on: the attempt fails, Ray Serve
            # starts a new replica, and the job's next attempt completes there.
            (crashed,) = await submit_mid_denoising(client, stack, redis, keys, third)
            kill_replica(app, "Generator")
            records = await stack.wait_terminal([crashed], timeout_s=180)
            assert records[crashed].status is JobStatus.COMPLETED, records[crashed]
            assert records[crashed].attempts == 2
            webhooks = await stack.wait_webhooks(crashed, 1, timeout_s=20)
            assert {kind for _, kind in webhooks} == {"job.completed"} and len(webhooks) == 1
            assert third.proc.poll() is None
    finally:
        await redis.aclose()
