"""What the cluster tests share: the Serve controller's timeline, `svd-serve worker` deploying onto a
cluster, submissions and the checks that a job ended once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from serving.types import JobStatus
from tests.cluster.ray_cluster import RayCluster
from tests.faults.conftest import RAY_READY_TIMEOUT_S, FaultStack, WorkerProc

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"
STATE_TIMEOUT_S = 420.0


class ServeTimeline:
    """Readings of `tests.cluster.serve_watch`: the controller's view, twice a second."""

    def __init__(self, cluster: RayCluster, app: str) -> None:
        self.readings: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster.serve_watch", cluster.address, app, "0.5"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.readings.append(json.loads(line))

    def generators(self) -> tuple[int, int] | None:
        """(wanted, running) of the Generator in the latest reading."""
        for reading in reversed(self.readings):
            if "Generator" in reading["deployments"]:
                wanted, running = reading["deployments"]["Generator"]
                return int(wanted), int(running)
        return None

    async def wait_for(self, what: str, check: Callable[[tuple[int, int]], bool], timeout_s: float,
                       moot: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Until the Generator counts pass `check`; fails early once `moot()` says the state
        can no longer come (the work it needed is gone)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = self.generators()
            if counts is not None and check(counts):
                return
            if moot is not None and await moot():
                break
            await asyncio.sleep(0.25)  # polling the timeline, bounded by the deadline
        tail = [(round(r["t"] % 1000, 1), r["app"], r["deployments"].get("Generator")) for r in self.readings[-30:]]
        raise TimeoutError(f"Generators never {what} within {timeout_s} s; last readings: {tail}")

    def running_counts(self) -> list[int]:
        """The Generator's running replicas, reading by reading."""
        return [int(r["deployments"]["Generator"][1]) for r in self.readings if "Generator" in r["deployments"]]

    def app_statuses_since_running(self) -> set[str | None]:
        first = next(i for i, r in enumerate(self.readings) if r["app"] == "RUNNING")
        return {r["app"] for r in self.readings[first:]}

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self._pump.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_cluster_worker(stack: FaultStack, cluster: RayCluster, data_dir: Path, **settings: Any) -> WorkerProc:
    """`svd-serve worker` deploying the app onto the running cluster (as KubeRay's serveConfigV2
    would from `serving.worker.entrypoint`)."""
    env = stack.env(data_dir=data_dir, ray_address=cluster.address, **settings)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "worker"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    worker = WorkerProc(proc, own_group=True)
    worker.pump = threading.Thread(target=worker._pump, daemon=True)
    worker.pump.start()
    stack.workers.append(worker)
    worker.wait_for_line("svd-serve worker ready", RAY_READY_TIMEOUT_S)
    return worker


async def submit(client: httpx.AsyncClient, webhook_url: str, fields: dict[str, str]) -> str:
    response = await client.post(
        "/api/v1/animate-image", files={"image": ("sample.png", SAMPLE.read_bytes(), "image/png")},
        data={**fields, "webhookUrl": webhook_url},
    )
    assert response.status_code == 202, response.text
    return str(response.json()["jobId"])


def stored_objects(data_dir: Path, owner: str, job_id: str) -> list[str]:
    return sorted(p.name for p in data_dir.glob(f"**/objects/{owner}/{job_id}/*"))


async def assert_completed_once(stack: FaultStack, data_dir: Path, job_ids: list[str]) -> None:
    records = await stack.wait_terminal(job_ids, timeout_s=STATE_TIMEOUT_S)
    for job_id in job_ids:
        record = records[job_id]
        assert record.status is JobStatus.COMPLETED, record
        assert record.provider == "local", (record.provider, record.routing_reason)
        webhooks = await stack.wait_webhooks(job_id, 1, timeout_s=60)
        assert {kind for _, kind in webhooks} == {"job.completed"} and len(webhooks) == 1, webhooks
        assert stored_objects(data_dir, stack.owner, job_id) == ["input.png", "thumbnail.jpg", "video.mp4"]
