"""Live job events: Server-Sent Events and the same sequence over WebSocket.

`GET /api/v1/animate-image/{jobId}/events` (SSE; resume with the `Last-Event-ID` header or a
`lastEventId` query parameter) and `GET /api/v1/animate-image/{jobId}/ws` (WebSocket; bearer
header or `token` query parameter, resume with `lastEventId`). Both read the job's Redis stream
(`serving.events`), so any replica serves any job and a reconnect continues where it stopped.
A `completed` event gets fresh download URLs each time it is served.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Header, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from starlette.requests import HTTPConnection

from serving import strict_json
from serving.db.jobs import JobRecord
from serving.errors import SvdServeError
from serving.events import (
    STATUS_EVENTS,
    EventType,
    Heartbeat,
    JobEvent,
    event_data,
    parse_event_id,
)
from serving.ingress.deps import JobIdPath, OwnerDep, Services, ServicesDep, get_owner
from serving.webhooks.services import DeliveryServices
from serving.ingress.views import job_view

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/api/v1/animate-image", tags=["events"])

SSE_RETRY_MS = 2000  # how soon a browser's EventSource reconnects after a drop
# WebSocket close codes (4000-4999 are the application's): 4000 + the HTTP status the same
# refusal gets over HTTP (4401 bad key, 4403 key without `read`, 4404 unknown job, 4422 bad
# `lastEventId`, 4429 rate limited); 1011 for a server error.
WS_APPLICATION_BASE = 4000
WS_INTERNAL_ERROR = 1011


def ws_close_code(error: SvdServeError) -> int:
    return WS_APPLICATION_BASE + error.status if 400 <= error.status < 500 else WS_INTERNAL_ERROR


EVENTS_DOC = """Server-Sent Events for one job: `queued` (with `queuePosition`), `processing`,
`progress` (`step` of `steps`, `progress` 0..1), then one of `completed` (with fresh `resultUrl`,
`thumbnailUrl`, `outputs`), `error` or `canceled`, after which the stream ends. Every event has an
`id`; reconnect with `Last-Event-ID` to get only what you missed. Comments (`: ping`) keep idle
connections open."""


def delivery_of(services: Services) -> DeliveryServices:
    if services.delivery is None:  # the lifespan always sets it; a hand-built Services may not
        raise RuntimeError("events and webhooks are not set up on this ingress")
    return services.delivery


def _follow(services: Services, record: JobRecord, after: str) -> AsyncGenerator[JobEvent | Heartbeat, None]:
    delivery = delivery_of(services)
    events = delivery.events

    async def settle() -> str | None:
        # A job that has ended has a terminal event in its stream: make sure of it (Redis may
        # have lost it, or it expired) and say where it is.
        current = await services.jobs.get(record.id)
        if current is None or not current.status.terminal:
            return None
        return await events.publish(current.id, STATUS_EVENTS[current.status], event_data(current))

    return events.follow(record.id, after, heartbeat_s=delivery.heartbeat_s, settle=settle)


async def _served(services: Services, event: JobEvent) -> JobEvent:
    """The event as a client gets it: a completion carries download URLs signed just now."""
    if event.type is not EventType.COMPLETED:
        return event
    record = await services.jobs.get(event.job_id)
    if record is None:
        return event
    view = await job_view(services, record, live=False)
    data = {**event.data, "resultUrl": view.result_url, "thumbnailUrl": view.thumbnail_url, "outputs": view.outputs}
    return JobEvent(event.id, event.job_id, event.type, data)


def _sse(event: JobEvent) -> str:
    payload = strict_json.dumps(event.data)
    return f"id: {event.id}\nevent: {event.type.value}\ndata: {payload}\n\n"


async def _owned_job(services: Services, job_id: str, owner: str) -> JobRecord:
    return await services.jobs.owned(job_id, owner)


@router.get("/{job_id}/events", operation_id="streamJobEvents", description=EVENTS_DOC, response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(
    job_id: JobIdPath,
    services: ServicesDep,
    owner: OwnerDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    last_event_id_query: Annotated[str | None, Query(alias="lastEventId", max_length=64)] = None,
) -> StreamingResponse:
    record = await _owned_job(services, job_id, owner)
    after = parse_event_id(last_event_id or last_event_id_query)
    stream = _follow(services, record, after)

    async def body() -> AsyncIterator[str]:
        yield f"retry: {SSE_RETRY_MS}\n\n"
        try:
            async for item in stream:
                if isinstance(item, Heartbeat):
                    yield ": ping\n\n"
                else:
                    yield _sse(await _served(services, item))
        finally:
            await stream.aclose()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        # no-transform / X-Accel-Buffering: proxies must pass each event on at once.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )


async def _websocket_owner(websocket: WebSocket, services: Services) -> str:
    """The owner behind the bearer header, or behind `?token=` (browsers cannot set headers on
    a WebSocket). Reuses the HTTP routes' `get_owner` so both authenticate the same way."""
    token = websocket.query_params.get("token")
    connection: HTTPConnection = websocket
    if token and "authorization" not in websocket.headers:
        headers = [(k, v) for k, v in websocket.scope["headers"] if k.lower() != b"authorization"]
        headers.append((b"authorization", f"Bearer {token}".encode()))
        connection = HTTPConnection({**websocket.scope, "headers": headers})
    return await get_owner(connection, services)


@router.websocket("/{job_id}/ws")
async def job_events_ws(websocket: WebSocket, job_id: str) -> None:
    """The SSE sequence as JSON messages `{"id", "event", "data"}`; `{"event": "heartbeat"}`
    when idle; closed with 1000 after the terminal event, 4000 + the HTTP status on refusal."""
    await websocket.accept()  # accept first: a close code before accept would not reach the client
    services: Services = websocket.app.state.services
    try:
        owner = await _websocket_owner(websocket, services)
        record = await _owned_job(services, job_id, owner)
        after = parse_event_id(websocket.query_params.get("lastEventId"))
    except SvdServeError as exc:
        await websocket.close(code=ws_close_code(exc), reason=f"{exc.code}: {exc.message}"[:120])
        return

    async def pump() -> None:
        stream = _follow(services, record, after)
        try:
            async for item in stream:
                if isinstance(item, Heartbeat):
                    await websocket.send_text(strict_json.dumps({"event": "heartbeat"}))
                else:
                    await websocket.send_text(strict_json.dumps((await _served(services, item)).message()))
        finally:
            await stream.aclose()

    async def until_disconnect() -> None:
        # Reading is the only way to notice a client that went away while the stream is idle.
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sender = asyncio.create_task(pump())
    watcher = asyncio.create_task(until_disconnect())
    try:
        done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if sender in done:
            sender.result()  # re-raise a failure of the stream
            await websocket.close(code=1000)
    except WebSocketDisconnect:
        pass
    finally:
        for task in (sender, watcher):
            task.cancel()
        await asyncio.gather(sender, watcher, return_exceptions=True)

