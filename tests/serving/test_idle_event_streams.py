"""Followers of a job that waits in the queue: their streams stay open through long idle
stretches (heartbeats at the production interval, longer than redis-py 8's default 5 s read
timeout) and end with the job's terminal event. Real ingress (uvicorn), real BullMQ consumer,
real Redis and PostgreSQL; the job ahead is held by a gate, never by a sleep."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from serving.backend import StageCallback
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRepository
from serving.db.migrate import upgrade
from serving.events import EventStore, SinkGroup, StreamEventSink
from serving.ingress.app import create_app
from serving.keys import Keys
from serving.queue import QueueConsumer
from serving.redis_clients import BLOCKING_READ_MARGIN_S, command_client, read_timeout_of
from serving.settings import Settings
from serving.types import RenderJob, RenderOutcome, Stage, StoredObject
from serving.worker.runner import JobRunner, queue_consumer
from tests.serving.events_helpers import make_settings, owners, serve, sse_events
from tests.serving.test_events import png_bytes

pytestmark = pytest.mark.slow

HEARTBEAT_S = Settings.model_fields["events_heartbeat_s"].default  # what production runs with
REDIS_PY_DEFAULT_READ_TIMEOUT_S = 5.0
DEADLINE_S = 120.0  # generous bounds for a loaded 2-core machine; the waits are on states


@dataclass
class HeldFirstJob:
    """A backend that holds the first job it gets until `release` is set; later jobs run at once."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    name: str = "held"
    _seen: int = 0

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        self._seen += 1
        if self._seen == 1:
            self.holding.set()
            await asyncio.wait_for(self.release.wait(), timeout=DEADLINE_S)
        await on_stage(Stage.DENOISING, 0.5)
        key = f"{job.owner_id}/{job.job_id}/video.mp4"
        return RenderOutcome(objects={"mp4": StoredObject("video.mp4", key, f"local://{key}", "video/mp4", 10)},
                             gpu_seconds=0.1, device="cpu")

    async def discard(self, job: RenderJob) -> None:
        return None


@dataclass
class Followed:
    """What one follower saw: events in order, and how many heartbeats came in between."""

    events: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: int = 0
    heartbeat_seen: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None

    def heard_heartbeat(self) -> None:
        self.heartbeats += 1
        self.heartbeat_seen.set()

    @property
    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]


async def follow_sse(client: httpx.AsyncClient, job_id: str, seen: Followed) -> None:
    async with client.stream("GET", f"/api/v1/animate-image/{job_id}/events") as response:
        assert response.status_code == 200
        async for item in sse_events(response):
            if isinstance(item, str):
                seen.heard_heartbeat()
            else:
                seen.events.append({"event": item.event, "id": item.id, "data": item.data})
    # The server ended the stream (after the terminal event): a cut stream raises instead.


async def follow_ws(url: str, seen: Followed) -> None:
    async with ws_connect(url) as socket:
        try:
            while True:
                message = json.loads(await socket.recv())
                if message["event"] == "heartbeat":
                    seen.heard_heartbeat()
                else:
                    seen.events.append(message)
        except ConnectionClosed:
            pass
        seen.close_code = socket.close_code


@pytest.fixture
async def consumer_env(migrated_pg: str, redis_url: str, unique_prefix: str,
                       tmp_path: Path) -> AsyncIterator[tuple[Settings, HeldFirstJob, QueueConsumer]]:
    settings = make_settings(tmp_path, migrated_pg, redis_url, unique_prefix, events_heartbeat_s=HEARTBEAT_S,
                             dispatcher_concurrency=1)
    engine = make_engine(migrated_pg)
    client = aioredis.Redis.from_url(redis_url)
    keys = Keys(unique_prefix)
    backend = HeldFirstJob()
    store = EventStore(client, keys, ttl_s=settings.events_ttl_s, max_len=settings.events_max_len)
    runner = JobRunner(JobRepository(make_session_factory(engine)), backend, client, keys,
                       SinkGroup(StreamEventSink(store)))
    consumer = queue_consumer(settings, runner)
    await consumer.start()
    try:
        yield settings, backend, consumer
    finally:
        backend.release.set()
        await consumer.close(wait_for_active=False)
        await client.aclose()
        await engine.dispose()


async def test_followers_of_a_queued_job_get_heartbeats_then_its_outcome(
    consumer_env: tuple[Settings, HeldFirstJob, QueueConsumer], unique_prefix: str
) -> None:
    settings, backend, consumer = consumer_env
    assert HEARTBEAT_S > REDIS_PY_DEFAULT_READ_TIMEOUT_S  # the case that broke: idle longer than 5 s
    alice, _ = owners(unique_prefix)
    with serve(create_app(settings)) as ingress:
        async with httpx.AsyncClient(base_url=ingress.base_url, headers=alice.headers,
                                     timeout=httpx.Timeout(10, read=DEADLINE_S)) as client:
            image = {"image": ("a.png", png_bytes(), "image/png")}
            ahead = await client.post("/api/v1/animate-image", files=image, data={"numFrames": "4"})
            assert ahead.status_code == 202, ahead.text
            await asyncio.wait_for(backend.holding.wait(), timeout=DEADLINE_S)  # the first job runs
            behind = await client.post("/api/v1/animate-image", files=image, data={"numFrames": "4"})
            assert behind.status_code == 202, behind.text
            job_id = behind.json()["jobId"]

            by_sse, by_ws = Followed(), Followed()
            ws_url = ingress.base_url.replace("http://", "ws://") + f"/api/v1/animate-image/{job_id}/ws?token={alice.key}"
            followers = [asyncio.create_task(follow_sse(client, job_id, by_sse)),
                         asyncio.create_task(follow_ws(ws_url, by_ws))]
            # Both stay open while the job waits: a heartbeat reaches each (after HEARTBEAT_S idle).
            async with asyncio.timeout(DEADLINE_S):
                for seen in (by_sse, by_ws):
                    waiter = asyncio.create_task(seen.heartbeat_seen.wait())
                    done, _ = await asyncio.wait({waiter, *followers}, return_when=asyncio.FIRST_COMPLETED)
                    if waiter not in done:
                        waiter.cancel()
                        for task in done:
                            task.result()  # a follower that was cut raises here
                        raise AssertionError(f"a stream ended before its first heartbeat: {by_sse}, {by_ws}")
            backend.release.set()  # now the job ahead finishes and this one runs
            await asyncio.wait_for(asyncio.gather(*followers), timeout=DEADLINE_S)
            status = (await client.get(f"/api/v1/animate-image/status/{job_id}")).json()

    assert status["status"] == "completed"
    for seen in (by_sse, by_ws):
        assert seen.heartbeats >= 1
        assert seen.kinds[0] == "queued" and seen.kinds[-1] == "completed", seen.kinds
        assert "processing" in seen.kinds
    assert [e["id"] for e in by_sse.events] == [e["id"] for e in by_ws.events]
    assert by_ws.close_code == 1000
    # The consumer's BZPOPMIN (the other blocking read in the code base) outlasts its longest block.
    worker = consumer._worker
    assert worker is not None
    blocking = worker.backend.blocking_connection.conn.connection
    assert blocking is not None
    assert blocking.socket_timeout > max(worker.opts["drainDelay"], worker.maximumBlockTimeout)


async def test_blocking_readers_get_clients_that_outlast_their_blocks(
    tmp_path: Path, redis_url: str, unique_prefix: str
) -> None:
    """The followers' XREAD BLOCK gets a client whose read timeout outlasts the heartbeat (the
    queue consumer's BZPOPMIN is checked in the test above); a follower given a client that
    would cut it short refuses to start rather than failing after 5 s."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    upgrade(database)
    settings = Settings(data_dir=tmp_path, database_url=database, redis_url=redis_url, queue_name=unique_prefix,
                        key_prefix=unique_prefix)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        delivery = app.state.services.delivery
        assert read_timeout_of(delivery.event_reader) == HEARTBEAT_S + BLOCKING_READ_MARGIN_S
        assert read_timeout_of(delivery.redis) == REDIS_PY_DEFAULT_READ_TIMEOUT_S  # set, not defaulted

    quick = command_client(redis_url)
    try:
        store = EventStore(quick, Keys(unique_prefix), ttl_s=60, max_len=10)

        async def settle() -> str | None:
            return None

        with pytest.raises(RuntimeError, match="blocks on Redis for 15 s"):
            await anext(store.follow("job", "0-0", heartbeat_s=HEARTBEAT_S, settle=settle))
    finally:
        await quick.aclose()
