"""Scale-out on a real multi-node Ray cluster (one machine): the real Serve app deployed by
`svd-serve worker`, the queue-depth policy inside the real Serve controller, Generators with
`num_gpus=1` on worker nodes that each declare one logical GPU, fed by `svd-serve api` on real
Redis and PostgreSQL, with Runway (a loopback server speaking its REST contract) configured as
the fallback so that a wrong routing decision would show.

One cluster, in order: a backlog raises the Generators from 1 to 3 and every job completes; idle
brings them back to the minimum (0); a new job brings one up and runs locally, not on Runway;
`svd-serve drain-node` (a GPU pod's preStop) on the node of a job mid-denoising moves the job to
another node, which completes it with one webhook, one set of objects and no attempt spent. The
Serve application stays RUNNING throughout. Every wait is for a state, with a generous deadline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from serving.keys import Keys
from tests.cluster.ray_cluster import RayCluster
from tests.cluster.stack import STATE_TIMEOUT_S, ServeTimeline, assert_completed_once, start_cluster_worker, submit
from tests.fake_runway import running_fake_runway
from tests.faults.conftest import FaultStack, WorkerProc

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(1500)]

# A backlog that lasts: more work than one replica finishes while two more start (model load on
# busy cores) plus Serve's downscale delay, so "3 running" is a state to wait for, not a race.
BACKLOG = 8
BACKLOG_JOB = {"numFrames": "8", "numInferenceSteps": "20", "width": "128", "height": "128"}
QUICK_JOB = {"numFrames": "4", "numInferenceSteps": "4", "width": "64", "height": "64"}
# Far from done when the drain lands (a few seconds in): its Generator must hand it back.
LONG_JOB = {"numFrames": "8", "numInferenceSteps": "50", "width": "128", "height": "128"}
DRAIN_DEADLINE_S = 4


async def wait_step(redis: aioredis.Redis, keys: Keys, job_id: str, worker: WorkerProc) -> str:
    """Until the job has taken a denoising step; the Ray node its Generator runs on."""
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while time.monotonic() < deadline:
        step, node = await redis.hmget(keys.progress(job_id), "step", "node")
        if step is not None and int(step) >= 1 and node:
            return node.decode()
        assert worker.proc.poll() is None, "".join(worker.lines[-40:])
        await asyncio.sleep(0.1)  # polling the progress hash, bounded by the deadline
    raise TimeoutError(f"job {job_id} never denoising")


async def wait_node_empty(cluster: RayCluster, node: str) -> None:
    gcs = cluster.gcs()
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while (left := await gcs.serve_replicas_on(node)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)  # polling the GCS, bounded by the deadline
    assert not left, f"Serve replicas still on the drained node: {left}"


async def test_queue_depth_scaling_and_node_drain_on_a_real_cluster(
    stack: FaultStack, ray_cluster: RayCluster, redis_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    app = f"scale-{stack.prefix}"
    keys = Keys(stack.prefix)
    redis = aioredis.Redis.from_url(redis_url)
    timeline = ServeTimeline(ray_cluster, app)
    with running_fake_runway() as runway:
        settings: dict[str, Any] = {
            "serve_app_name": app, "generator_num_gpus": 1, "dispatcher_resources": '{"svd-dispatcher": 0.01}',
            # Two jobs per replica per target wait: eight jobs ask for four replicas, three at most.
            "autoscale_min_replicas": 0, "autoscale_max_replicas": 3, "autoscale_jobs_per_replica_per_min": 2,
            "autoscale_target_wait_s": 60, "autoscale_upscale_delay_s": 0, "autoscale_downscale_delay_s": 20,
            "autoscale_metrics_interval_s": 0.5, "dispatcher_concurrency": BACKLOG, "max_batch_size": 1,
            "metrics_replicas_interval_s": 1, "lock_duration_ms": 30000, "log_level": "INFO",
            # Runway as the fallback, quick to call the pool unhealthy: a cold start must not count.
            "fallback_enabled": "true", "runway_api_key": runway.api_key, "runway_base_url": runway.base_url,
            "local_unhealthy_threshold_s": 1, "local_cold_start_allowance_s": 600,
        }
        ingress = stack.start_ingress(data_dir, **settings)
        try:
            async with ingress.client() as client:
                # 1. A backlog raises the Generators from 1 (the initial replica, the only one that
                # can report the queue at first) to 3. The queue buffers it while the app deploys.
                backlog = [await submit(client, stack.receiver.url, BACKLOG_JOB) for _ in range(BACKLOG)]
                worker = start_cluster_worker(stack, ray_cluster, data_dir, **settings)
                async def backlog_done() -> bool:
                    records = [await stack.jobs.get(j) for j in backlog]
                    return all(r is not None and r.status.terminal for r in records)

                await timeline.wait_for("at 3", lambda c: c == (3, 3), STATE_TIMEOUT_S, moot=backlog_done)
                running = timeline.running_counts()
                assert 1 in running and running.index(1) < running.index(3), running
                await assert_completed_once(stack, data_dir, backlog)

                # 2. Idle brings them back to the minimum, zero (GPU nodes free to go).
                await timeline.wait_for("at 0", lambda c: c == (0, 0), STATE_TIMEOUT_S)

                # 3. From zero, a new job brings one up and runs locally: a cold start is not an
                # unhealthy pool, so nothing goes to Runway.
                cold = await submit(client, stack.receiver.url, QUICK_JOB)
                await timeline.wait_for("up from 0", lambda c: c[1] >= 1, STATE_TIMEOUT_S)
                await assert_completed_once(stack, data_dir, [cold])
                assert runway.count("POST", "/v1/image_to_video") == 0

                # 4. The node of a job mid-denoising is drained as a GPU pod's preStop does:
                # the run goes to another node, within the same attempt.
                moved = await submit(client, stack.receiver.url, LONG_JOB)
                node = await wait_step(redis, keys, moved, worker)
                assert node != ray_cluster.head.node_id  # type: ignore[union-attr]
                drained = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "serving.cli", "drain-node", "--address", ray_cluster.address,
                     "--node-id", node, "--deadline-s", str(DRAIN_DEADLINE_S), "--reason", "test preemption"],
                    env=stack.env(), capture_output=True, text=True, timeout=120,
                )
                assert drained.returncode == 0, drained.stdout + drained.stderr
                await wait_node_empty(ray_cluster, node)  # Serve moved its replicas elsewhere
                ray_cluster.worker(node).kill()  # the deadline passed: the node is gone
                await assert_completed_once(stack, data_dir, [moved])
                record = await stack.jobs.get(moved)
                assert record is not None and record.attempts == 1, record  # no attempt spent
                final_node = (await redis.hget(keys.progress(moved), "node") or b"").decode()
                assert final_node and final_node != node, (final_node, node)
                lines = "".join(worker.lines)
                assert "runs_handed_back" in lines and "generation_rescheduled" in lines

            # 5. Through scale-up, scale to zero, cold start and a node drain: always RUNNING.
            assert timeline.app_statuses_since_running() == {"RUNNING"}, timeline.readings[-10:]
            # Ray exports the policy's raw wish from the controller (scraped on the head's port).
            scraped = httpx.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
            assert "ray_serve_autoscaling_desired_replicas" in scraped
        finally:
            timeline.close()
            await redis.aclose()
            # Kept by pytest beside the test's tmp_path: what to read when a wait timed out.
            (tmp_path / "timeline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timeline.readings))
            (tmp_path / "worker.log").write_text("".join(line for w in stack.workers for line in w.lines))
