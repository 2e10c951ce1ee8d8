"""What the service answers, as small read-only objects (the JSON stays in `raw`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TERMINAL = frozenset({"completed", "error", "canceled"})


@dataclass(frozen=True)
class JobInfo:
    """A job's status (`GET /api/v1/animate-image/status/{id}`), or the answer to a submit
    (then only `id` and `status` are set)."""

    id: str
    status: str
    progress: float = 0.0
    stage: str | None = None
    queue_position: int | None = None
    model: str | None = None
    provider: str | None = None
    result_url: str | None = None
    thumbnail_url: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # output kind -> hex SHA-256
    error: dict[str, Any] | None = None  # {"code", "message"} when the job ended `error`
    warnings: list[Any] = field(default_factory=list)
    retry_of: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobInfo:
        return cls(
            id=str(data["jobId"]),
            status=str(data["status"]),
            progress=float(data.get("progress") or 0.0),
            stage=data.get("stage"),
            queue_position=data.get("queuePosition"),
            model=data.get("model"),
            provider=data.get("provider"),
            result_url=data.get("resultUrl"),
            thumbnail_url=data.get("thumbnailUrl"),
            outputs=dict(data.get("outputs") or {}),
            checksums=dict(data.get("checksums") or {}),
            error=data.get("error"),
            warnings=list(data.get("warnings") or []),
            retry_of=data.get("retryOf"),
            raw=data,
        )


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: `queued`, `processing`, `progress`, `completed`, `error`
    or `canceled`; `id` is what a reconnect sends as `Last-Event-ID`."""

    id: str
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL

    @classmethod
    def from_sse(cls, id: str, event: str, data: str) -> Event:
        parsed = json.loads(data) if data else {}
        return cls(id=id, type=event, data=parsed if isinstance(parsed, dict) else {"value": parsed})


@dataclass(frozen=True)
class JobPage:
    """One page of `list()`; pass `next_cursor` as `cursor` for the next."""

    jobs: list[JobInfo]
    next_cursor: str | None
