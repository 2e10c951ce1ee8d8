"""Spot-preemption notices from the instance metadata service, for `svd-serve spot-watch`.

Where the notice belongs: on the GPU node itself. The watcher runs as a sidecar of each GPU pod
(same network namespace, so it reads *its own* node's metadata) and turns a notice into a drain
of its own Ray node (serving.worker.node_drain) with the notice's deadline. Clusters that already
act on the notice (Karpenter's interruption queue or the AWS Node Termination Handler on EKS,
GKE's graceful node shutdown) need no watcher: they delete the pod, whose preStop drains the Ray
node. docs/scaling.md compares the two.

Notices and their real windows: AWS spot `instance-action` two minutes before the stop (IMDSv2;
pods reach it only with a metadata hop limit of 2); GCE `instance/preempted` at the start of the
30-second preemption; GCE `instance/maintenance-event` about 60 s before a host maintenance that
terminates GPU VMs (they cannot live-migrate).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import httpx
import structlog

from serving.settings import Settings

log = structlog.get_logger(__name__)

AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
# The metadata services answer on the node itself, within milliseconds.
_METADATA_TIMEOUT_S = 2.0
_AWS_TOKEN_TTL_S = 21600
AWS_NOTICE_S = 120.0  # when the notice carries no usable time
GCP_PREEMPTION_S = 30.0
GCP_MAINTENANCE_S = 60.0


@dataclass(frozen=True)
class Notice:
    """A preemption announced: why, and when the node goes (epoch seconds)."""

    reason: str
    deadline: float

    def seconds_left(self, now: float | None = None) -> float:
        return max(0.0, self.deadline - (time.time() if now is None else now))


class PreemptionNotice(Protocol):
    """Asks whether this node is about to be taken away."""

    async def check(self) -> Notice | None:
        """A notice when a preemption is announced, None otherwise."""
        ...

    async def aclose(self) -> None: ...


class AwsSpotNotice:
    """EC2 spot interruption notice via IMDSv2: `spot/instance-action` is 404 until AWS decides
    to stop or terminate the instance, then `{"action": ..., "time": "2026-11-25T16:00:00Z"}`."""

    def __init__(self, base_url: str = AWS_METADATA_URL) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=_METADATA_TIMEOUT_S)

    async def check(self) -> Notice | None:
        token = await self._client.put(
            "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(_AWS_TOKEN_TTL_S)}
        )
        token.raise_for_status()
        answer = await self._client.get(
            "/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token.text}
        )
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        notice = answer.json()
        when = str(notice.get("time", ""))
        try:
            deadline = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
        except ValueError:
            deadline = time.time() + AWS_NOTICE_S
        return Notice(f"aws spot {notice.get('action', 'interruption')} at {when or 'soon'}", deadline)

    async def aclose(self) -> None:
        await self._client.aclose()


class GcpPreemptionNotice:
    """GCE spot/preemptible VM: `instance/preempted` reads TRUE once the VM is being preempted
    (30 s left); `instance/maintenance-event` leaves NONE when a host maintenance approaches."""

    def __init__(self, base_url: str = GCP_METADATA_URL) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url, timeout=_METADATA_TIMEOUT_S, headers={"Metadata-Flavor": "Google"}
        )

    async def check(self) -> Notice | None:
        preempted = await self._client.get("/computeMetadata/v1/instance/preempted")
        preempted.raise_for_status()
        if preempted.text.strip().upper() == "TRUE":
            return Notice("gcp preemption", time.time() + GCP_PREEMPTION_S)
        maintenance = await self._client.get("/computeMetadata/v1/instance/maintenance-event")
        maintenance.raise_for_status()
        event = maintenance.text.strip().upper()
        if event and event != "NONE":
            return Notice(f"gcp maintenance {event.lower()}", time.time() + GCP_MAINTENANCE_S)
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


class TriggeredNotice:
    """A notice a test (or an operator hook) raises by hand."""

    def __init__(self) -> None:
        self._notice: Notice | None = None

    def trigger(self, reason: str = "test preemption", seconds: float = 30.0) -> None:
        self._notice = Notice(reason, time.time() + seconds)

    async def check(self) -> Notice | None:
        return self._notice

    async def aclose(self) -> None:
        return None


def notice_from_settings(settings: Settings) -> PreemptionNotice | None:
    if settings.preemption_watcher == "aws":
        return AwsSpotNotice()
    if settings.preemption_watcher == "gcp":
        return GcpPreemptionNotice()
    return None


class PreemptionWatcher:
    """Polls a `PreemptionNotice` and calls `on_notice` once, with the notice, when one comes."""

    def __init__(
        self, notice: PreemptionNotice, on_notice: Callable[[Notice], Awaitable[object]], poll_s: float
    ) -> None:
        self._notice = notice
        self._on_notice = on_notice
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self.noticed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="preemption-watcher")

    async def run(self) -> None:
        while True:
            try:
                notice = await self._notice.check()
            except (httpx.HTTPError, ValueError) as exc:
                # The metadata service is local and rarely fails; keep watching.
                log.warning("preemption_check_failed", error=repr(exc))
                notice = None
            if notice is not None:
                log.warning("preemption_notice", reason=notice.reason, seconds_left=round(notice.seconds_left(), 1))
                self.noticed.set()
                await self._on_notice(notice)
                return
            await asyncio.sleep(self._poll_s)  # the polling period, not a synchronisation

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
        await self._notice.aclose()


class NodeDrainer(Protocol):
    """What the watcher drains with (serving.worker.node_drain.GcsNodes)."""

    def drain(self, node_id: str, *, deadline_s: float | None, message: str) -> None: ...


async def watch_and_drain(source: PreemptionNotice, nodes: NodeDrainer, node_id: str, poll_s: float,
                          margin_s: float = 5.0) -> Notice:
    """`svd-serve spot-watch`: wait for this node's spot notice, then drain its Ray node with the
    notice's deadline (less `margin_s`, so the replicas are gone before the VM) and return it."""
    drained: list[Notice] = []

    async def drain(notice: Notice) -> None:
        deadline_s = max(0.0, notice.seconds_left() - margin_s)
        await asyncio.to_thread(nodes.drain, node_id, deadline_s=deadline_s, message=notice.reason)
        log.warning("node_drain_requested", node_id=node_id, deadline_s=round(deadline_s, 1), reason=notice.reason)
        drained.append(notice)

    watcher = PreemptionWatcher(source, drain, poll_s)
    try:
        await watcher.run()
    finally:
        await watcher.aclose()
    return drained[0]
