"""Live job events on real Redis, real PostgreSQL and real HTTP: SSE clients that drop and
resume (also on another ingress after a restart), two ingress servers at once, WebSocket, owner
checks, and the terminal-event guarantees. Jobs are driven by a real JobRunner with a stepping
backend (no Ray)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from PIL import Image
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.events import EventStore, EventType, SinkGroup, StreamEventSink
from serving.ingress.app import create_app
from serving.keys import Keys
from serving.queue import ConsumedJobInfo, JobQueue
from serving.security.api_keys import ApiKeyRepository
from serving.security.scopes import Scope
from serving.settings import Settings
from serving.types import JobStatus, QueuedJob
from serving.worker.runner import JobRunner
from tests.serving.events_helpers import (
    Owner,
    SseEvent,
    SteppedBackend,
    make_settings,
    new_job,
    owners,
    serve,
    sse_events,
)

FIRST_ATTEMPT = ConsumedJobInfo(attempt=1, max_attempts=3)
STREAM_TIMEOUT_S = 20


@dataclass
class Env:
    settings: Settings
    jobs: JobRepository
    redis: aioredis.Redis
    keys: Keys
    store: EventStore
    alice: Owner
    bob: Owner

    def runner(self, backend: SteppedBackend) -> JobRunner:
        sink = SinkGroup(StreamEventSink(self.store))
        return JobRunner(self.jobs, backend, self.redis, self.keys, sink)

    async def announce_queued(self, job_id: str) -> None:
        """What the ingress does after it enqueued a submission."""
        record = await self.jobs.get(job_id)
        assert record is not None
        await StreamEventSink(self.store).job_changed(record, queue_position=0)


@pytest.fixture
async def env(migrated_pg: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Env]:
    settings = make_settings(tmp_path, migrated_pg, redis_url, unique_prefix)
    engine = make_engine(migrated_pg)
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys(unique_prefix)
    alice, bob = owners(unique_prefix)
    try:
        yield Env(settings, JobRepository(make_session_factory(engine)), client, keys,
                  EventStore(client, keys, ttl_s=settings.events_ttl_s, max_len=settings.events_max_len), alice, bob)
    finally:
        await client.aclose()
        await engine.dispose()


def events_path(job_id: str) -> str:
    return f"/api/v1/animate-image/{job_id}/events"


async def read_events(response: httpx.Response, until: int | None = None) -> list[SseEvent]:
    """Events of an open SSE response: `until` of them, or all until the server ends the stream."""
    received: list[SseEvent] = []
    async with asyncio.timeout(STREAM_TIMEOUT_S):
        async for item in sse_events(response):
            if isinstance(item, SseEvent):
                received.append(item)
                if until is not None and len(received) == until:
                    break
    return received


async def test_sse_client_resumes_with_last_event_id_on_a_restarted_ingress(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    await env.announce_queued(job_id)
    backend = SteppedBackend(steps=4)
    gate2, gate4 = backend.gate(2), backend.gate(4)
    run = None
    with serve(create_app(env.settings)) as first_ingress:
        async with httpx.AsyncClient(base_url=first_ingress.base_url, headers=env.alice.headers) as client:
            async with client.stream("GET", events_path(job_id)) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                run = asyncio.create_task(env.runner(backend).handle(QueuedJob(job_id, env.alice.id), FIRST_ATTEMPT))
                before = await read_events(response, until=3)  # then the client drops
    # The ingress it used is gone; while nobody listens the job moves on.
    gate2.set()
    await asyncio.wait_for(backend.reached[4].wait(), timeout=10)

    with serve(create_app(env.settings)) as second_ingress:
        async with httpx.AsyncClient(base_url=second_ingress.base_url, headers=env.alice.headers) as client:
            headers = {"Last-Event-ID": before[-1].id or ""}
            async with client.stream("GET", events_path(job_id), headers=headers) as response:
                after: list[SseEvent] = []
                heartbeat_seen = False
                async with asyncio.timeout(STREAM_TIMEOUT_S):
                    async for item in sse_events(response):
                        if isinstance(item, str):
                            heartbeat_seen = True
                            gate4.set()  # idle long enough for a heartbeat: let the job finish
                        else:
                            after.append(item)
                # The loop ended because the server closed the stream after the terminal event.
    assert run is not None
    await asyncio.wait_for(run, timeout=10)

    assert [e.event for e in before] == ["queued", "processing", "progress"]
    assert [e.event for e in after] == ["progress", "progress", "progress", "completed"]
    assert heartbeat_seen
    assert [round(e.data["progress"], 2) for e in before[2:] + after[:3]] == [0.2, 0.4, 0.6, 0.8]
    # No gap, no duplicate: together they are exactly the stream.
    history = await env.store.history(job_id)
    assert [e.id for e in before + after] == [e.id for e in history]
    completed = after[-1].data
    assert completed["status"] == "completed" and completed["jobId"] == job_id
    assert completed["resultUrl"].startswith(env.settings.resolved_public_base_url + "/files/")
    assert completed["outputs"]["mp4"] == completed["resultUrl"]
    assert before[0].data["queuePosition"] == 0


async def test_two_ingress_servers_serve_the_same_sequence(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    await env.announce_queued(job_id)
    backend = SteppedBackend(steps=3)
    start = backend.gate(1)
    with serve(create_app(env.settings)) as one, serve(create_app(env.settings)) as two:
        async with (
            httpx.AsyncClient(base_url=one.base_url, headers=env.alice.headers) as client_one,
            httpx.AsyncClient(base_url=two.base_url, headers=env.alice.headers) as client_two,
            client_one.stream("GET", events_path(job_id)) as stream_one,
            client_two.stream("GET", events_path(job_id)) as stream_two,
        ):
            readers = [asyncio.create_task(read_events(s)) for s in (stream_one, stream_two)]
            run = asyncio.create_task(env.runner(backend).handle(QueuedJob(job_id, env.alice.id), FIRST_ATTEMPT))
            start.set()
            seen_one, seen_two = await asyncio.gather(*readers)
            await asyncio.wait_for(run, timeout=10)
    expected = ["queued", "processing", "progress", "progress", "progress", "completed"]
    assert [e.event for e in seen_one] == expected
    assert [(e.id, e.event) for e in seen_one] == [(e.id, e.event) for e in seen_two]
    assert [e.data.get("progress") for e in seen_one[:-1]] == [e.data.get("progress") for e in seen_two[:-1]]


async def test_websocket_sees_the_same_sequence(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    await env.announce_queued(job_id)
    backend = SteppedBackend(steps=2)
    start = backend.gate(1)
    with serve(create_app(env.settings)) as ingress:
        ws_base = ingress.base_url.replace("http://", "ws://")
        url = f"{ws_base}/api/v1/animate-image/{job_id}/ws?token={env.alice.key}"
        async with ws_connect(url) as socket:
            run = asyncio.create_task(env.runner(backend).handle(QueuedJob(job_id, env.alice.id), FIRST_ATTEMPT))
            start.set()
            messages: list[dict[str, object]] = []
            async with asyncio.timeout(STREAM_TIMEOUT_S):
                try:
                    while True:
                        messages.append(json.loads(await socket.recv()))
                except ConnectionClosed:
                    pass
            assert socket.close_code == 1000
        await asyncio.wait_for(run, timeout=10)

        # Resuming over WebSocket skips what was seen; an SSE client gets the same ids.
        events = [m for m in messages if m["event"] != "heartbeat"]
        async with ws_connect(f"{url}&lastEventId={events[2]['id']}") as socket:
            rest = [json.loads(m) async for m in socket]
        async with httpx.AsyncClient(base_url=ingress.base_url, headers=env.alice.headers) as client:
            async with client.stream("GET", events_path(job_id)) as response:
                sse = await read_events(response)
    assert [m["event"] for m in events] == ["queued", "processing", "progress", "progress", "completed"]
    assert [(m["id"], m["event"]) for m in events] == [(e.id, e.event) for e in sse]
    assert [m["id"] for m in rest if m["event"] != "heartbeat"] == [m["id"] for m in events[3:]]
    completed = events[-1]["data"]
    assert isinstance(completed, dict) and completed["resultUrl"]


async def test_websocket_refusals_use_close_codes(env: Env) -> None:
    """4000 + the HTTP status of the same refusal, one code per reason."""
    job_id = await new_job(env.jobs, env.alice.id)
    engine = make_engine(env.settings.database_url or "")
    try:
        _, submit_only = await ApiKeyRepository(make_session_factory(engine)).create(env.alice.id, [Scope.SUBMIT])
    finally:
        await engine.dispose()
    with serve(create_app(env.settings)) as ingress:
        base = ingress.base_url.replace("http://", "ws://") + f"/api/v1/animate-image/{job_id}/ws"
        for url, code in (
            (f"{base}?token=not-a-key", 4401),
            (f"{base}?token={submit_only}", 4403),  # a key without the `read` scope
            (f"{base}?token={env.bob.key}", 4404),  # another owner's job looks missing
            (f"{base}?token={env.alice.key}&lastEventId=bogus", 4422),
        ):
            async with ws_connect(url) as socket:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(socket.recv(), timeout=10)
                assert socket.close_code == code
        # The bearer header works as well as the token parameter.
        async with ws_connect(base, additional_headers=env.alice.headers) as socket:
            await env.jobs.transition(job_id, JobStatus.CANCELED)
            async with asyncio.timeout(10):
                messages = [json.loads(m) async for m in socket]
            assert [m["event"] for m in messages if m["event"] != "heartbeat"] == ["canceled"]


async def test_owner_check_and_bad_last_event_id(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    with serve(create_app(env.settings)) as ingress:
        async with httpx.AsyncClient(base_url=ingress.base_url) as client:
            foreign = await client.get(events_path(job_id), headers=env.bob.headers)
            missing = await client.get(events_path("0b9a3c1e-1f7e-4a8e-9a51-8d7c6b5a4f3e"), headers=env.alice.headers)
            unauthenticated = await client.get(events_path(job_id))
            bad_id = await client.get(events_path(job_id), headers={**env.alice.headers, "Last-Event-ID": "yesterday"})
    assert foreign.status_code == 404 and missing.status_code == 404
    assert foreign.json()["code"] == missing.json()["code"] == "not_found"
    assert unauthenticated.status_code == 401
    assert bad_id.status_code == 422 and bad_id.json()["code"] == "invalid_last_event_id"


async def test_a_finished_job_whose_events_were_lost_gets_its_terminal_event(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    await env.jobs.transition(job_id, JobStatus.PROCESSING)
    await env.jobs.transition(job_id, JobStatus.ERROR, error_code="generation_failed", error_message="NaN")
    with serve(create_app(env.settings)) as ingress:
        async with httpx.AsyncClient(base_url=ingress.base_url, headers=env.alice.headers) as client:
            async with client.stream("GET", events_path(job_id)) as response:
                events = await read_events(response)
            # A client that already has the terminal event is told nothing more and let go.
            last = {"Last-Event-ID": events[-1].id or ""}
            async with client.stream("GET", events_path(job_id), headers=last) as response:
                again = await read_events(response)
    assert [e.event for e in events] == ["error"]
    assert events[0].data["error"] == {"code": "generation_failed", "message": "NaN"}
    assert again == []


async def test_a_follower_settles_when_the_terminal_event_was_never_published(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    await env.announce_queued(job_id)
    with serve(create_app(env.settings)) as ingress:
        async with httpx.AsyncClient(base_url=ingress.base_url, headers=env.alice.headers) as client:
            async with client.stream("GET", events_path(job_id)) as response:
                reader = asyncio.create_task(read_events(response))
                # Canceled behind the event stream's back (a publisher that crashed): the
                # follower notices on its next idle check and back-fills the event.
                await env.jobs.transition(job_id, JobStatus.CANCELED)
                events = await reader
    assert [e.event for e in events] == ["queued", "canceled"]


async def test_one_terminal_event_per_job(env: Env) -> None:
    job_id = await new_job(env.jobs, env.alice.id)
    first = await env.store.publish(job_id, EventType.COMPLETED, {"jobId": job_id})
    again = await env.store.publish(job_id, EventType.COMPLETED, {"jobId": job_id})
    other = await env.store.publish(job_id, EventType.CANCELED, {"jobId": job_id})
    assert first == again == other
    assert [e.type for e in await env.store.history(job_id)] == [EventType.COMPLETED]
    ttl = await env.redis.ttl(env.keys.events(job_id))
    assert 0 < ttl <= env.settings.events_ttl_s


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


async def test_submission_and_cancel_through_the_api_emit_events(env: Env) -> None:
    with serve(create_app(env.settings)) as ingress:
        async with httpx.AsyncClient(base_url=ingress.base_url, headers=env.alice.headers) as client:
            accepted = await client.post(
                "/api/v1/animate-image", files={"image": ("a.png", png_bytes(), "image/png")}, data={"numFrames": "4"}
            )
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["jobId"]
            assert accepted.json()["eventsUrl"].endswith(events_path(job_id))
            async with client.stream("GET", events_path(job_id)) as response:
                reader = asyncio.create_task(read_events(response))
                canceled = await client.delete(f"/api/v1/animate-image/{job_id}")
                assert canceled.status_code == 200, canceled.text
                events = await reader
    queue = JobQueue(env.settings.redis_url or "", env.settings.queue_name)
    await queue.obliterate()
    await queue.close()
    assert [e.event for e in events] == ["queued", "canceled"]
    assert events[0].data["queuePosition"] == 0 and events[0].data["status"] == "queued"
    assert events[1].data["status"] == "canceled"
