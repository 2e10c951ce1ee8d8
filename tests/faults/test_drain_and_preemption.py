"""The drain (finish what ends within the grace period, hand back the rest) and the preemption
watcher against loopback servers that speak the AWS IMDSv2 and GCE metadata protocols."""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timezone
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis.asyncio as aioredis

from serving.keys import Keys
from serving.queue import ConsumedJobInfo, JobQueue, QueueConsumer
from serving.types import Priority, QueuedJob
from serving.worker.drain import Drainer, progress_estimate, remaining_from_progress
from serving.worker.preemption import (
    AwsSpotNotice,
    GcpPreemptionNotice,
    Notice,
    PreemptionWatcher,
    TriggeredNotice,
    watch_and_drain,
)

WAIT_S = 10.0


def test_remaining_from_progress() -> None:
    assert remaining_from_progress(10.0, 0.0) is None
    assert remaining_from_progress(10.0, 0.5) == pytest.approx(10.0)
    assert remaining_from_progress(9.0, 0.9) == pytest.approx(1.0)
    assert remaining_from_progress(3.0, 1.0) == 0.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_drain_finishes_the_nearly_done_job_and_hands_back_the_other(
    redis_url: str, unique_prefix: str, redis: aioredis.Redis
) -> None:
    keys = Keys(unique_prefix)
    queue = JobQueue(redis_url, unique_prefix)
    started: dict[str, asyncio.Event] = {"near": asyncio.Event(), "far": asyncio.Event()}
    finish_near = asyncio.Event()
    finished: list[str] = []
    requeued: list[str] = []
    handed_back = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        started[job.job_id].set()
        if job.job_id == "near":
            await finish_near.wait()  # released by the test once the drain has begun
            finished.append(job.job_id)
        else:
            await asyncio.Event().wait()  # a job far from done

    async def on_handed_back(job_id: str) -> None:
        requeued.append(job_id)
        handed_back.set()

    consumer = QueueConsumer(redis_url, unique_prefix, handler, concurrency=2, lock_duration_ms=60000)
    try:
        for job_id in ("near", "far"):
            await queue.add(QueuedJob(job_id=job_id, owner_id="o"), priority=Priority.NORMAL, attempts=2,
                            backoff_ms=10)
        await consumer.start()
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), WAIT_S)
        # 99 % done: a tiny remainder, well within the grace period; "far" reported nothing yet.
        await redis.hset(keys.progress("near"), mapping={"progress": 0.99})
        drainer = Drainer(consumer, progress_estimate(redis, keys), on_handed_back, grace_s=20.0)
        drain = asyncio.create_task(drainer.drain("test"))
        await asyncio.wait_for(handed_back.wait(), WAIT_S)  # "far" went back; "near" still runs
        assert not drain.done()
        finish_near.set()
        report = await asyncio.wait_for(drain, WAIT_S)
        assert report.finished == ["near"] and report.handed_back == ["far"]
        assert finished == ["near"] and requeued == ["far"]
        assert await drainer.drain("again") is report  # one drain per process
        assert await queue.position("far") == 0
        counts = await queue.counts()
        assert (counts["completed"], counts["waiting"], counts["active"]) == (1, 1, 0)
    finally:
        await consumer.close(wait_for_active=False)
        await queue.obliterate()
        await queue.close()


async def test_drain_hands_back_a_job_that_outlives_the_grace_period(
    redis_url: str, unique_prefix: str, redis: aioredis.Redis
) -> None:
    keys = Keys(unique_prefix)
    queue = JobQueue(redis_url, unique_prefix)
    running = asyncio.Event()

    async def handler(job: QueuedJob, info: ConsumedJobInfo) -> None:
        running.set()
        await asyncio.Event().wait()

    async def nothing(job_id: str) -> None:
        return None

    consumer = QueueConsumer(redis_url, unique_prefix, handler, lock_duration_ms=60000)
    try:
        await queue.add(QueuedJob(job_id="slow", owner_id="o"), priority=Priority.HIGH, attempts=1, backoff_ms=10)
        await consumer.start()
        await asyncio.wait_for(running.wait(), WAIT_S)
        # Its estimate says it fits, but it does not end in time: handed back at the deadline.
        await redis.hset(keys.progress("slow"), mapping={"progress": 0.999})
        report = await asyncio.wait_for(Drainer(consumer, progress_estimate(redis, keys), nothing, 0.3).drain("t"),
                                        WAIT_S)
        assert report.finished == [] and report.handed_back == ["slow"]
        assert await queue.position("slow") == 0
    finally:
        await consumer.close(wait_for_active=False)
        await queue.obliterate()
        await queue.close()


class MetadataServer:
    """Speaks the slice of the AWS IMDSv2 and GCE metadata protocols the notices use."""

    def __init__(self) -> None:
        self.aws_action: str | None = None
        self.gcp_preempted = False
        self.gcp_maintenance = "NONE"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self._answer(200, b"token-123")
                else:
                    self._answer(400, b"")

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != "token-123":
                        self._answer(401, b"")
                    elif server.aws_action is None:
                        self._answer(404, b"Not Found")
                    else:
                        body = f'{{"action": "{server.aws_action}", "time": "2026-11-25T16:00:00Z"}}'
                        self._answer(200, body.encode())
                elif self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        self._answer(403, b"")
                    else:
                        self._answer(200, b"TRUE" if server.gcp_preempted else b"FALSE")
                elif self.path == "/computeMetadata/v1/instance/maintenance-event":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        self._answer(403, b"")
                    else:
                        self._answer(200, server.gcp_maintenance.encode())
                else:
                    self._answer(404, b"")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def metadata() -> Iterator[MetadataServer]:
    server = MetadataServer()
    yield server
    server.http.shutdown()
    server.http.server_close()


async def test_aws_notice(metadata: MetadataServer) -> None:
    notice = AwsSpotNotice(metadata.url)
    try:
        assert await notice.check() is None
        metadata.aws_action = "terminate"
        found = await notice.check()
        assert found is not None and found.reason == "aws spot terminate at 2026-11-25T16:00:00Z"
        assert found.deadline == datetime(2026, 11, 25, 16, tzinfo=timezone.utc).timestamp()  # AWS's own time
    finally:
        await notice.aclose()


async def test_gcp_notices(metadata: MetadataServer) -> None:
    notice = GcpPreemptionNotice(metadata.url)
    try:
        assert await notice.check() is None
        metadata.gcp_maintenance = "TERMINATE_ON_HOST_MAINTENANCE"  # GPU VMs cannot live-migrate
        found = await notice.check()
        assert found is not None and found.reason == "gcp maintenance terminate_on_host_maintenance"
        assert 50 < found.seconds_left() <= 60
        metadata.gcp_preempted = True
        found = await notice.check()
        assert found is not None and found.reason == "gcp preemption" and 20 < found.seconds_left() <= 30
    finally:
        await notice.aclose()


async def test_spot_watch_drains_its_own_node_with_the_notices_deadline(metadata: MetadataServer) -> None:
    drains: list[tuple[str, float | None, str]] = []

    class Nodes:
        def drain(self, node_id: str, *, deadline_s: float | None, message: str) -> None:
            drains.append((node_id, deadline_s, message))

    metadata.gcp_preempted = True
    notice = await asyncio.wait_for(
        watch_and_drain(GcpPreemptionNotice(metadata.url), Nodes(), "node-1", poll_s=0.02, margin_s=5), WAIT_S
    )
    assert notice.reason == "gcp preemption"
    ((node, deadline_s, message),) = drains
    assert node == "node-1" and message == "gcp preemption"
    assert deadline_s is not None and 15 < deadline_s <= 25  # 30 s notice less the 5 s margin


async def test_watcher_starts_the_drain_once(metadata: MetadataServer) -> None:
    reasons: list[str] = []
    called = asyncio.Event()

    async def on_notice(notice: Notice) -> None:
        reasons.append(notice.reason)
        called.set()

    watcher = PreemptionWatcher(AwsSpotNotice(metadata.url), on_notice, poll_s=0.02)
    watcher.start()
    try:
        assert not watcher.noticed.is_set()
        metadata.aws_action = "stop"
        await asyncio.wait_for(called.wait(), WAIT_S)
        assert reasons == ["aws spot stop at 2026-11-25T16:00:00Z"]
    finally:
        await watcher.aclose()

    trigger = TriggeredNotice()
    watcher = PreemptionWatcher(trigger, on_notice, poll_s=0.02)
    watcher.start()
    try:
        trigger.trigger("operator")
        await asyncio.wait_for(watcher.noticed.wait(), WAIT_S)
    finally:
        await watcher.aclose()
    assert reasons[-1] == "operator"
