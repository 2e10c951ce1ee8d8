"""The Generator's watchdog (issue #5): `check_health` fails when a generation is stuck (no new
denoising progress for `watchdog_stall_s`), has run past its wall-clock deadline
(`job_deadline_s`), or the CUDA context is broken. Ray Serve then restarts the replica; the
dispatcher's call fails and the job goes back to the queue for another attempt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import structlog

from serving.keys import Keys
from serving.settings import Settings

log = structlog.get_logger(__name__)

# Reads a job's latest progress marker (any value that changes as steps complete), or None.
ProgressReader = Callable[[str], object]
DeviceCheck = Callable[[], None]


class UnhealthyReplica(RuntimeError):
    """Raised from `check_health`: Ray Serve restarts a replica whose health check raises."""


@dataclass
class _Running:
    started: float
    last_change: float
    last_value: object = None
    count: int = 1  # the same job id may be in flight twice after a retry


class GenerationWatchdog:
    """Tracks the generations running in this replica and judges whether they still move."""

    def __init__(
        self,
        progress_of: ProgressReader,
        stall_s: float,
        deadline_s: float,
        device_check: DeviceCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._progress_of = progress_of
        self._stall_s = stall_s
        self._deadline_s = deadline_s
        self._device_check = device_check
        self._clock = clock
        self._running: dict[str, _Running] = {}

    @contextmanager
    def watch(self, job_id: str) -> Iterator[None]:
        """Around one generation of `job_id`."""
        entry = self._running.get(job_id)
        if entry is None:
            now = self._clock()
            self._running[job_id] = _Running(started=now, last_change=now)
        else:
            entry.count += 1
        try:
            yield
        finally:
            entry = self._running[job_id]
            entry.count -= 1
            if entry.count == 0:
                del self._running[job_id]

    async def check(self) -> None:
        """Raise `UnhealthyReplica` when a generation is stuck or late, or the device is broken."""
        for job_id, entry in list(self._running.items()):
            # A Redis read: off the replica's event loop, which also serves the batch queue.
            value = await asyncio.to_thread(self._progress_of, job_id)
            now = self._clock()
            if value != entry.last_value:
                entry.last_value, entry.last_change = value, now
            if now - entry.started > self._deadline_s:
                log.error("generation_deadline_exceeded", job_id=job_id, seconds=round(now - entry.started, 1))
                raise UnhealthyReplica(f"job {job_id} has run {now - entry.started:.0f} s, past its deadline")
            if now - entry.last_change > self._stall_s:
                log.error("generation_stuck", job_id=job_id, seconds=round(now - entry.last_change, 1))
                raise UnhealthyReplica(f"job {job_id} made no progress for {now - entry.last_change:.0f} s")
        if self._device_check is not None:
            self._device_check()


def cuda_context_check() -> None:
    """Fail on a broken CUDA context: after a sticky error (illegal address, ECC, Xid) every CUDA
    call returns it. `mem_get_info` does not wait for running kernels, so it is safe mid-job."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.mem_get_info()
    except RuntimeError as exc:
        raise UnhealthyReplica(f"CUDA context is broken: {exc}") from exc


def generator_watchdog(settings: Settings) -> GenerationWatchdog:
    """The Generator's watchdog: progress is the hash the GenerationService writes every step."""
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=5)
    keys = Keys(settings.key_prefix)

    def progress_of(job_id: str) -> object:
        return client.hget(keys.progress(job_id), "progress")

    return GenerationWatchdog(
        progress_of, settings.watchdog_stall_s, settings.job_deadline_s, device_check=cuda_context_check
    )
