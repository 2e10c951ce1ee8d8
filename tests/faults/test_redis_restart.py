"""Fault-injection suite (issue #5), item 5 (Redis half): a redis-server that the test runs with
AOF `everysec` is killed and restarted between accept and dispatch; every job accepted more than
a second before (here: once its queue entry is in the AOF file) completes, and the ingress keeps
accepting after the restart."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from serving.local_stack import free_port
from serving.types import JobStatus
from tests.faults.conftest import FaultStack
from tests.faults.test_ingress_faults import submit

pytestmark = pytest.mark.slow


class PrivateRedis:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.dir = data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                # Ready once it has loaded the AOF (LOADING errors until then).
                if client.ping() and client.info("persistence")["loading"] == 0:
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)  # polling the server, bounded by the deadline
        client.close()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def aof_text(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.dir.rglob("*.aof*") if p.is_file())


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(timeout=10)


@pytest.fixture
def redis_url(private_redis: PrivateRedis) -> str:
    """The whole stack of this module runs on the private redis-server."""
    return private_redis.url


async def test_redis_killed_between_accept_and_dispatch(stack: FaultStack, private_redis: PrivateRedis,
                                                        tmp_path: Path) -> None:
    ingress = stack.start_ingress(tmp_path / "ingress")
    async with ingress.client() as client:
        before = [(await submit(client, "normal")).json()["jobId"] for _ in range(4)]
        # Accepted "more than a second before": wait until everysec has written them to the AOF.
        deadline = time.monotonic() + 10
        while not all(job_id.encode() in private_redis.aof_text() for job_id in before):
            assert time.monotonic() < deadline, "the AOF never received the queued jobs"
            time.sleep(0.1)  # polling the AOF file, bounded by the deadline
        private_redis.kill()
        private_redis.start()
        # The ingress reconnects by itself; new work is accepted again.
        after: list[str] = []
        deadline = time.monotonic() + 15
        while len(after) < 2:
            try:
                answer = await submit(client, "normal")
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 202:
                after.append(answer.json()["jobId"])
            else:
                assert time.monotonic() < deadline, answer.text if answer is not None else "no answer"
    stack.start_worker(step_s=0.02, steps=2, dispatcher_concurrency=2)
    records = await stack.wait_terminal(before + after, timeout_s=30)
    assert all(r.status is JobStatus.COMPLETED for r in records.values()), records
