"""Live job events: one Redis stream per job, written by whoever changes the job, read by every
ingress replica (SSE and WebSocket).

Why a stream: its entry ids are ordered and unique, so they are the SSE event ids; a client that
reconnects with `Last-Event-ID` gets exactly the entries after it (XRANGE/XREAD), from any replica
and after any restart, because nothing lives in the ingress. Each stream is capped (MAXLEN) and
expires `events_ttl_s` after its last entry. A stream holds at most one terminal event: terminal
events are written by a script that first looks for one (a job that ran twice, or a follower that
back-fills a terminal event Redis lost, cannot add a second).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT
import structlog

from serving import strict_json
from serving.db.jobs import JobRecord
from serving.errors import InvalidInput
from serving.keys import Keys
from serving.redis_clients import check_can_block
from serving.types import JobStatus

log = structlog.get_logger(__name__)


class EventType(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    PROGRESS = "progress"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (EventType.COMPLETED, EventType.ERROR, EventType.CANCELED)


# The event each job status announces (progress events come from progress reports instead).
STATUS_EVENTS: Final = {
    JobStatus.QUEUED: EventType.QUEUED,
    JobStatus.PROCESSING: EventType.PROCESSING,
    JobStatus.COMPLETED: EventType.COMPLETED,
    JobStatus.ERROR: EventType.ERROR,
    JobStatus.CANCELED: EventType.CANCELED,
}

START: Final = "0-0"  # the id before every event: "from the beginning"
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


@dataclass(frozen=True)
class JobEvent:
    """One event of one job; `id` is its stream entry id and the SSE `id:`."""

    id: str
    job_id: str
    type: EventType
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type.terminal

    def message(self) -> dict[str, Any]:
        """The JSON form WebSocket clients get (SSE carries the same in its fields)."""
        return {"id": self.id, "event": self.type.value, "data": self.data}


class Heartbeat:
    """Yielded by `EventStore.follow` when the stream was idle for a heartbeat interval."""


HEARTBEAT: Final = Heartbeat()


def parse_event_id(raw: str | None) -> str:
    """A client's `Last-Event-ID` as a stream id; none means from the start."""
    if raw is None or not raw.strip():
        return START
    raw = raw.strip()
    if not _EVENT_ID.match(raw):
        raise InvalidInput(
            f"Last-Event-ID must be an event id this API sent (like 1732540000000-0), not {raw[:64]!r}.",
            code="invalid_last_event_id",
        )
    return raw


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def event_data(record: JobRecord, *, queue_position: int | None = None) -> dict[str, Any]:
    """What a status event says about the job (result URLs are added when it is served)."""
    data: dict[str, Any] = {
        "jobId": record.id,
        "status": record.status.value,
        "stage": record.stage,
        "attempts": record.attempts,
        "at": _now_iso(),
    }
    if record.status is JobStatus.QUEUED:
        data["queuePosition"] = queue_position
    elif record.status is JobStatus.COMPLETED:
        data["progress"] = 1.0
    elif record.status is JobStatus.ERROR:
        data["error"] = {"code": record.error_code, "message": record.error_message or ""}
    return data


def progress_data(job_id: str, *, stage: str, progress: float, step: int | None, steps: int | None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "jobId": job_id,
        "status": JobStatus.PROCESSING.value,
        "stage": stage,
        "progress": round(float(progress), 4),
        "at": _now_iso(),
    }
    if step is not None and steps is not None:
        data.update(step=step, steps=steps)
    return data


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


# A stream's entries as redis-py returns them over RESP2 (our clients' protocol): (id, fields) pairs.
_Entries = list[tuple[Any, dict[Any, Any]]]


def _list(reply: object) -> list[Any]:
    if not isinstance(reply, list):
        raise TypeError(f"expected a RESP2 list reply from Redis, got {type(reply).__name__}")
    return reply


def _entries(reply: object) -> _Entries:
    """XRANGE's reply, or one stream's part of XREAD's: a list of (id, fields)."""
    return [] if reply is None else _list(reply)


def stream_fields(event_type: EventType, data: dict[str, Any]) -> dict[FieldT, EncodableT]:
    return {"type": event_type.value, "data": strict_json.dumps(data)}  # served as is: strict JSON


def _decode(job_id: str, entry_id: Any, fields: dict[Any, Any]) -> JobEvent:
    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    values = {text(k): text(v) for k, v in fields.items()}
    return JobEvent(
        id=text(entry_id), job_id=job_id, type=EventType(values["type"]), data=json.loads(values["data"])
    )


# Adds the terminal event unless the stream already has one; returns the terminal event's id.
# Terminal events are last, so the newest entries are looked at first.
_ENSURE_TERMINAL = """
local entries = redis.call('XREVRANGE', KEYS[1], '+', '-')
for i = 1, #entries do
  local fields = entries[i][2]
  for j = 1, #fields, 2 do
    if fields[j] == 'type' and (fields[j + 1] == 'completed' or fields[j + 1] == 'error'
        or fields[j + 1] == 'canceled') then
      return entries[i][1]
    end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return id
"""

# Adds the event only to an empty stream (see `EventStore.publish_first`).
_PUBLISH_FIRST = """
if redis.call('XLEN', KEYS[1]) > 0 then
  return false
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return id
"""


class EventStore:
    """Writes and reads job event streams (async; the ingress and the dispatcher use it).

    `reader` serves `follow`'s blocking reads (XREAD BLOCK for a heartbeat interval): it must be a
    `serving.redis_clients.blocking_client` whose read timeout outlasts the heartbeat; `client`
    (quick commands) is used when none is given, and `follow` refuses it if it cannot block."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, ttl_s: int, max_len: int, reader: aioredis.Redis | None = None
    ) -> None:
        self._redis = client
        self._reader = reader or client
        self._keys = keys
        self._ttl_s = ttl_s
        self._max_len = max_len
        self._ensure_terminal = client.register_script(_ENSURE_TERMINAL)
        self._publish_first = client.register_script(_PUBLISH_FIRST)

    async def publish(self, job_id: str, event_type: EventType, data: dict[str, Any]) -> str:
        """Append an event and return its id. A terminal event is added only if the stream has
        none yet; then the id of the one already there is returned."""
        key = self._keys.events(job_id)
        fields = stream_fields(event_type, data)
        if event_type.terminal:
            result = await self._ensure_terminal(
                keys=[key], args=[self._max_len, fields["type"], fields["data"], self._ttl_s]
            )
            return result.decode() if isinstance(result, bytes) else str(result)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, fields, maxlen=self._max_len, approximate=True)
            pipe.expire(key, self._ttl_s)
            entry_id, _ = await pipe.execute()
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def publish_first(self, job_id: str, event_type: EventType, data: dict[str, Any]) -> str | None:
        """Append an event only if the job has none yet; None if it had. The ingress announces
        `queued` after the enqueue (to know the position), by when an idle worker may already
        have announced `processing`: then the stale `queued` is dropped rather than misordered."""
        fields = stream_fields(event_type, data)
        result = await self._publish_first(
            keys=[self._keys.events(job_id)], args=[self._max_len, fields["type"], fields["data"], self._ttl_s]
        )
        if result is None:
            return None
        return result.decode() if isinstance(result, bytes) else str(result)

    async def history(self, job_id: str, after: str = START) -> list[JobEvent]:
        """Every kept event after `after`, oldest first."""
        entries = _entries(await self._redis.xrange(self._keys.events(job_id), min=f"({after}", max="+"))
        return [_decode(job_id, entry_id, fields) for entry_id, fields in entries]

    async def follow(
        self,
        job_id: str,
        after: str,
        *,
        heartbeat_s: float,
        settle: Callable[[], Awaitable[str | None]],
    ) -> AsyncGenerator[JobEvent | Heartbeat, None]:
        """The events after `after` as they come, ending with the terminal one; `HEARTBEAT` after
        each idle `heartbeat_s`.

        `settle` is awaited at the start and whenever the stream is idle: for a job that has
        ended it makes sure the stream holds its terminal event and returns that event's id
        (None while the job runs). So a follower never waits forever on an event that was lost,
        and one that already saw the terminal event (its `after` is not before it) ends at once.
        """
        key = self._keys.events(job_id)
        last = after
        check = True
        block_ms = max(1, int(heartbeat_s * 1000))
        check_can_block(self._reader, block_ms / 1000, "An event follower")
        while True:
            if check:
                terminal_id = await settle()
                if terminal_id is not None and _id_key(terminal_id) <= _id_key(last):
                    return
                check = False
            reply = await self._reader.xread({key: last}, count=100, block=block_ms)
            if not reply:
                check = True
                yield HEARTBEAT
                continue
            for entry_id, fields in _entries(_list(reply)[0][1]):
                event = _decode(job_id, entry_id, fields)
                last = event.id
                yield event
                if event.terminal:
                    return


class JobEventSink(Protocol):
    """Told about every job status change (by `serving.lifecycle.JobLifecycle`; progress goes
    through `serving.progress`). Implementations log their own failures: a lost notification
    must not fail a job."""

    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None: ...


class StreamEventSink:
    """Publishes status changes and progress to the job's event stream."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None:
        event_type, data = STATUS_EVENTS[record.status], event_data(record, queue_position=queue_position)
        try:
            if record.status is JobStatus.QUEUED and record.attempts == 0:
                await self._store.publish_first(record.id, event_type, data)  # the submission's
            else:
                await self._store.publish(record.id, event_type, data)
        except Exception as exc:  # a follower back-fills a lost terminal event from the job row
            log.warning("event_publish_failed", job_id=record.id, status=record.status.value, error=repr(exc))



class SinkGroup:
    """Several sinks behind one hook; one failing does not keep the others from hearing."""

    def __init__(self, *sinks: JobEventSink) -> None:
        self._sinks = sinks

    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None:
        for sink in self._sinks:
            try:
                await sink.job_changed(record, queue_position=queue_position)
            except Exception as exc:
                log.error("event_sink_failed", sink=type(sink).__name__, job_id=record.id, error=repr(exc))
