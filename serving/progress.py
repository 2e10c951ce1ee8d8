"""The one writer of a job's live progress: its progress hash and its `progress` events.

Two places report progress: the Generator's denoising thread (synchronous Redis, every step)
and the runner (async, at stage changes). Both write the same hash (`Keys.progress`) and the
same event stream (`Keys.events`), so both go through `queue_progress`, which puts every write
into one transaction: the hash and the stream always expire and carry the same fields, whoever
wrote last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis

from serving.events import EventType, progress_data, stream_fields
from serving.keys import PROGRESS_TTL_S, Keys
from serving.settings import Settings


@dataclass(frozen=True)
class ProgressReport:
    """Where one job is: a stage and 0..1, with the denoising step when there is one."""

    job_id: str
    stage: str
    progress: float
    step: int | None = None
    steps: int | None = None
    node: str | None = None  # the Ray node running the job (scale-out and drain tests read it)

    def hash_fields(self) -> dict[str, str | int]:
        fields: dict[str, str | int] = {"progress": f"{self.progress:.4f}", "stage": self.stage}
        if self.step is not None and self.steps is not None:
            fields.update(step=self.step, steps=self.steps)
        if self.node is not None:
            fields["node"] = self.node
        return fields


class _Pipeline(Protocol):
    """The commands `queue_progress` buffers; redis-py's sync and async pipelines both have them."""

    def hset(self, name: str, *, mapping: Any) -> Any: ...
    def expire(self, name: str, time: int) -> Any: ...
    def xadd(self, name: str, fields: Any, *, maxlen: int | None, approximate: bool) -> Any: ...


def queue_progress(pipe: _Pipeline, keys: Keys, report: ProgressReport, *, ttl_s: int, max_len: int) -> None:
    """Buffer the writes of one report: the hash, then the event, each with its expiry."""
    key = keys.progress(report.job_id)
    pipe.hset(key, mapping=report.hash_fields())
    pipe.expire(key, PROGRESS_TTL_S)
    data = progress_data(report.job_id, stage=report.stage, progress=report.progress, step=report.step,
                         steps=report.steps)
    stream = keys.events(report.job_id)
    pipe.xadd(stream, stream_fields(EventType.PROGRESS, data), maxlen=max_len, approximate=True)
    pipe.expire(stream, ttl_s)


@dataclass(frozen=True)
class StreamLimits:
    """How long a job's event stream lives after its last entry, and how many entries it keeps."""

    ttl_s: int
    max_len: int

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(ttl_s=settings.events_ttl_s, max_len=settings.events_max_len)

    @classmethod
    def default(cls) -> StreamLimits:
        """The settings' defaults, for a writer built without settings (tests, tools)."""
        fields = Settings.model_fields
        return cls(ttl_s=fields["events_ttl_s"].default, max_len=fields["events_max_len"].default)


class SyncProgressWriter:
    """Writes progress from synchronous code (the Generator's denoising thread)."""

    def __init__(self, client: redis.Redis, keys: Keys, limits: StreamLimits) -> None:
        self._redis = client
        self._keys = keys
        self._limits = limits

    def write(self, report: ProgressReport) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            queue_progress(pipe, self._keys, report, ttl_s=self._limits.ttl_s, max_len=self._limits.max_len)
            pipe.execute()


class ProgressWriter:
    """Writes progress from async code (the runner, at each stage of a job)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, limits: StreamLimits) -> None:
        self._redis = client
        self._keys = keys
        self._limits = limits

    async def write(self, report: ProgressReport) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            queue_progress(pipe, self._keys, report, ttl_s=self._limits.ttl_s, max_len=self._limits.max_len)
            await pipe.execute()
