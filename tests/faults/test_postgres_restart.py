"""Fault-injection suite (issue #5), item 5 (PostgreSQL half): a PostgreSQL server that the test
runs is restarted while jobs run; the ingress and the dispatcher reconnect and no job is lost."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.db.migrate import upgrade
from serving.local_stack import free_port
from serving.types import JobStatus
from tests.faults.conftest import FaultStack
from tests.faults.test_ingress_faults import submit

pytestmark = pytest.mark.slow


class PrivatePostgres:
    """initdb + pg_ctl as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="svd-faults-pg-"))
        shutil.chown(self.root, "postgres")
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["su", "postgres", "-c", " ".join(args)], check=True, capture_output=True, timeout=60)

    def init_and_start(self) -> None:
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        self.start()

    def start(self) -> None:
        options = f"'-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1'"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.init_and_start()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            server.remove()


@pytest.fixture
def faults_database_url(private_pg: PrivatePostgres) -> str:
    """The whole stack of this module runs on the private PostgreSQL."""
    upgrade(private_pg.url)
    return private_pg.url


async def test_postgres_restart_mid_run(stack: FaultStack, private_pg: PrivatePostgres, tmp_path: Path) -> None:
    ingress = stack.start_ingress(tmp_path / "ingress")
    stack.start_worker(step_s=0.1, steps=8, dispatcher_concurrency=2, job_backoff_ms=1000)
    async with ingress.client() as client:
        accepted = [(await submit(client, "normal")).json()["jobId"] for _ in range(5)]
        deadline = time.monotonic() + 15
        while not stack.runs():
            assert time.monotonic() < deadline, "no job started"
            time.sleep(0.05)  # polling the run log, bounded by the deadline
        private_pg.stop("fast")  # mid-run: two jobs are denoising and will write their results
        private_pg.start()
        deadline = time.monotonic() + 20
        while len(accepted) < 7:
            try:
                answer = await submit(client, "normal")
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 202:
                accepted.append(answer.json()["jobId"])
            else:
                assert time.monotonic() < deadline, answer.text if answer is not None else "no answer"
    records = await stack.wait_terminal(accepted, timeout_s=40)
    assert all(r.status is JobStatus.COMPLETED for r in records.values()), {
        j: (r.status.value, r.error_message) for j, r in records.items()
    }
