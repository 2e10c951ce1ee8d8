"""The Serve application's state, reported by the Dispatcher into Redis: replicas wanted vs
running per deployment, whether the application is RUNNING, and the Dispatcher's provider breakers.

The exporter cannot reach Ray (it runs outside the cluster and keeps working while the cluster is
down), so a Dispatcher replica asks the Serve controller every `interval_s` and writes the
gauges; they go stale (`GAUGE_TTL_S`) when no Dispatcher is left to refresh them, which the
`SvdNoReadyGpuReplica` and `SvdServeAppNotRunning` alerts treat like zero.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog

from serving.keys import Keys
from serving.metrics import APP_RUNNING, BREAKER_OPEN, REPLICAS_RUNNING, REPLICAS_WANTED, MetricBatch

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


def app_status(details: dict[str, Any], app_name: str) -> str | None:
    """The application's status ("RUNNING", "DEPLOYING", "UNHEALTHY"...), None when absent."""
    app = (details.get("applications") or {}).get(app_name)
    if not app:
        return None
    return str(app.get("status")).rsplit(".", 1)[-1]


def _serve_details() -> dict[str, Any]:
    # The controller's own view, the one `serve status` prints; there is no public Python call
    # that returns the target replica count.
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("Ray Serve is not running here: no controller client")
    return dict(client.get_serve_details())


class ReplicaReporter:
    """Writes `svd_serve_replicas_wanted/_running`, `svd_serve_application_running` and
    `svd_provider_breaker_open` every `interval_s` until closed."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        app_name: str,
        interval_s: float,
        breakers: Callable[[], dict[str, bool]] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._app_name = app_name
        self._interval_s = interval_s
        self._breakers = breakers
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
        batch = MetricBatch(self._keys)
        if self._breakers is not None:  # first: it needs no controller
            for provider, is_open in self._breakers().items():
                batch.set(BREAKER_OPEN, {"provider": provider}, 1.0 if is_open else 0.0)
        try:
            details = await asyncio.to_thread(_serve_details)
        finally:
            await batch.aflush(self._redis)
        counts = replica_counts(details, self._app_name)
        for deployment, (wanted, running) in counts.items():
            batch.set(REPLICAS_WANTED, {"deployment": deployment}, wanted)
            batch.set(REPLICAS_RUNNING, {"deployment": deployment}, running)
        running_app = app_status(details, self._app_name) == "RUNNING"
        batch.set(APP_RUNNING, {"application": self._app_name}, 1.0 if running_app else 0.0)
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
