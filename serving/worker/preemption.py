"""Spot-preemption notices (issue #5): a small interface, the AWS and GCP metadata services behind
it, and a trigger for tests. A notice starts the same drain as SIGTERM, earlier: AWS gives two
minutes' warning, GCP about thirty seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


class PreemptionNotice(Protocol):
    """Asks whether this node is about to be taken away."""

    async def check(self) -> str | None:
        """A reason when a preemption is announced, None otherwise."""
        ...

    async def aclose(self) -> None: ...


class AwsSpotNotice:
    """EC2 spot interruption notice via IMDSv2: `spot/instance-action` is 404 until AWS decides
    to stop or terminate the instance, then `{"action": ..., "time": ...}`."""

    def __init__(self, base_url: str = AWS_METADATA_URL) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=_METADATA_TIMEOUT_S)

    async def check(self) -> str | None:
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
        return f"aws spot {notice.get('action', 'interruption')} at {notice.get('time', 'soon')}"

    async def aclose(self) -> None:
        await self._client.aclose()


class GcpPreemptionNotice:
    """GCE preemptible/spot VM: `instance/preempted` reads TRUE once the VM is being preempted."""

    def __init__(self, base_url: str = GCP_METADATA_URL) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=_METADATA_TIMEOUT_S)

    async def check(self) -> str | None:
        answer = await self._client.get(
            "/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"}
        )
        answer.raise_for_status()
        return "gcp preemption" if answer.text.strip().upper() == "TRUE" else None

    async def aclose(self) -> None:
        await self._client.aclose()


class TriggeredNotice:
    """A notice a test (or an operator hook) raises by hand."""

    def __init__(self) -> None:
        self._reason: str | None = None

    def trigger(self, reason: str = "test preemption") -> None:
        self._reason = reason

    async def check(self) -> str | None:
        return self._reason

    async def aclose(self) -> None:
        return None


def notice_from_settings(settings: Settings) -> PreemptionNotice | None:
    if settings.preemption_watcher == "aws":
        return AwsSpotNotice()
    if settings.preemption_watcher == "gcp":
        return GcpPreemptionNotice()
    return None


class PreemptionWatcher:
    """Polls a `PreemptionNotice` and calls `on_notice` once, with the reason, when one comes."""

    def __init__(
        self, notice: PreemptionNotice, on_notice: Callable[[str], Awaitable[object]], poll_s: float
    ) -> None:
        self._notice = notice
        self._on_notice = on_notice
        self._poll_s = poll_s
        self._task: asyncio.Task[None] | None = None
        self.noticed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="preemption-watcher")

    async def _run(self) -> None:
        while True:
            try:
                reason = await self._notice.check()
            except (httpx.HTTPError, ValueError) as exc:
                # The metadata service is local and rarely fails; keep watching.
                log.warning("preemption_check_failed", error=repr(exc))
                reason = None
            if reason is not None:
                log.warning("preemption_notice", reason=reason)
                self.noticed.set()
                await self._on_notice(reason)
                return
            await asyncio.sleep(self._poll_s)  # the polling period, not a synchronisation

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])
        await self._notice.aclose()


def watch_for_preemption(
    settings: Settings, on_notice: Callable[[str], Awaitable[object]]
) -> PreemptionWatcher | None:
    """A started watcher for the configured cloud, or None (`preemption_watcher="none"`)."""
    notice = notice_from_settings(settings)
    if notice is None:
        return None
    watcher = PreemptionWatcher(notice, on_notice, settings.preemption_poll_s)
    watcher.start()
    return watcher
