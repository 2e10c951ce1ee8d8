"""Replicas wanted vs running per Ray Serve deployment, reported by the Dispatcher into Redis.

The ingress cannot reach Ray (it runs outside the cluster and keeps working while the cluster is
down), so a Dispatcher replica asks the Serve controller every `interval_s` and writes the two
gauges; they expire (`GAUGE_TTL_S`) when no Dispatcher is left to refresh them, which the
`SvdNoReadyGpuReplica` alert treats like zero.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import structlog

from serving.keys import Keys
from serving.metrics import REPLICAS_RUNNING, REPLICAS_WANTED, MetricBatch

log = structlog.get_logger(__name__)


def replica_counts(details: dict[str, Any], app_name: str) -> dict[str, tuple[int, int]]:
    """{deployment: (wanted, running)} from the controller's `get_serve_instance_details()`."""
    app = (details.get("applications") or {}).get(app_name) or {}
    counts: dict[str, tuple[int, int]] = {}
    for name, deployment in (app.get("deployments") or {}).items():
        replicas = deployment.get("replicas") or []
        running = sum(1 for r in replicas if str(r.get("state")) in ("RUNNING", "ReplicaState.RUNNING"))
        counts[name] = (int(deployment.get("target_num_replicas") or 0), running)
    return counts


def _serve_details() -> dict[str, Any]:
    # The controller's own view, the one `serve status` prints; there is no public Python call
    # that returns the target replica count.
    from ray.serve.context import _get_global_client

    return dict(_get_global_client().get_serve_details())


class ReplicaReporter:
    """Writes `svd_serve_replicas_wanted/_running` every `interval_s` until closed."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, app_name: str, interval_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._app_name = app_name
        self._interval_s = interval_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-reporter")

    async def close(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await asyncio.wait([self._task])
            self._task = None

    async def report_once(self) -> dict[str, tuple[int, int]]:
        counts = replica_counts(await asyncio.to_thread(_serve_details), self._app_name)
        batch = MetricBatch(self._keys)
        for deployment, (wanted, running) in counts.items():
            batch.set(REPLICAS_WANTED, {"deployment": deployment}, wanted)
            batch.set(REPLICAS_RUNNING, {"deployment": deployment}, running)
        await batch.aflush(self._redis)
        return counts

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.report_once()
            except Exception as exc:  # the controller restarting: report again next round
                log.warning("replica_report_failed", error=repr(exc))
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self._interval_s)
            except TimeoutError:
                pass
