"""Fault-injection harness: dispatcher processes (`tests.faults.worker_main`) on real Redis and
PostgreSQL, killed and stopped by the tests, plus a loopback webhook receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRecord, JobRepository
from serving.db.migrate import upgrade
from serving.local_stack import free_port
from serving.ingress.schemas import AnimateOptions
from serving.ingress.validation import resolve_params
from serving.queue import JobQueue
from serving.types import Priority, QueuedJob

# Valid parameters as the ingress stores them; the stand-in backend does not read them.
PARAMS = resolve_params(AnimateOptions(), "tiny-random").to_json()
API_KEY = "faults-key"
SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD3CUf1w/Iw6s="
READY_TIMEOUT_S = 30.0
RAY_READY_TIMEOUT_S = 240.0  # Ray start-up plus the Serve app on two busy cores


class WebhookReceiver:
    """Records every webhook POST: (webhook-id, event type, job id)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, str]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.append((self.headers["webhook-id"], body["type"], body["data"]["jobId"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_job(self, job_id: str) -> set[tuple[str, str]]:
        """Distinct (webhook-id, type) messages about the job (a redelivery repeats its id)."""
        return {(wid, kind) for wid, kind, jid in list(self.received) if jid == job_id}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class WorkerProc:
    proc: subprocess.Popen[str]
    own_group: bool = False  # leads a process group of its own (a Ray node)
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None and not any(l.startswith(prefix) for l in self.lines):
                raise RuntimeError(f"worker exited {self.proc.returncode}:\n{''.join(self.lines[-40:])}")
            time.sleep(0.05)  # polling the child's output, bounded by the deadline
        raise TimeoutError(f"no {prefix!r} from the worker within {timeout_s} s:\n{''.join(self.lines[-40:])}")

    def close(self) -> None:
        if self.pump is not None:
            self.pump.join(timeout=10)  # ends at EOF, once the process is gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)


@dataclass
class IngressProc:
    proc: subprocess.Popen[bytes]
    base_url: str

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


@dataclass
class FaultStack:
    database_url: str
    redis_url: str
    prefix: str
    owner: str
    run_log: Path
    receiver: WebhookReceiver
    jobs: JobRepository
    queue: JobQueue
    workers: list[WorkerProc] = field(default_factory=list)
    ingresses: list[IngressProc] = field(default_factory=list)

    def env(self, **settings: Any) -> dict[str, str]:
        env = {
            **os.environ,
            "SVD_SERVE_DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "SVD_SERVE_QUEUE_NAME": self.prefix,
            "SVD_SERVE_KEY_PREFIX": self.prefix,
            "SVD_SERVE_WEBHOOK_SECRETS": SECRET,
            "SVD_SERVE_ALLOW_PRIVATE_URLS": "true",
            "SVD_SERVE_WEBHOOK_POLL_INTERVAL_S": "0.1",
            "SVD_SERVE_LOG_LEVEL": "WARNING",
        }
        env.update({f"SVD_SERVE_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def start_ingress(self, data_dir: Path, **settings: Any) -> IngressProc:
        """`svd-serve api` as its own process, on a free loopback port."""
        port = free_port()
        env = self.env(api_keys=f"{self.owner}:{API_KEY}", data_dir=data_dir, port=port,
                       rate_limit_per_s=1000, rate_limit_burst=1000, max_concurrent_jobs=1000, **settings)
        data_dir.mkdir(parents=True, exist_ok=True)
        with (data_dir / "ingress.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "api"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        ingress = IngressProc(proc, f"http://127.0.0.1:{port}")
        self.ingresses.append(ingress)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ingress.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                output = (data_dir / "ingress.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"ingress did not start (exit {proc.poll()}):\n{output}")
            time.sleep(0.1)  # polling /readyz, bounded by the deadline
        return ingress

    def start_worker(self, step_s: float = 0.2, steps: int = 5, **settings: Any) -> WorkerProc:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.worker_main", "--run-log", str(self.run_log),
             "--step-s", str(step_s), "--steps", str(steps)],
            env=self.env(**settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        worker = WorkerProc(proc)
        worker.pump = threading.Thread(target=worker._pump, daemon=True)
        worker.pump.start()
        self.workers.append(worker)
        worker.wait_for_line("fault worker ready", READY_TIMEOUT_S)
        return worker

    def start_ray_worker(self, data_dir: Path, **settings: Any) -> WorkerProc:
        """`svd-serve worker` as its own process: a private local Ray cluster with the real Serve
        app (Dispatcher, Generator with the tiny model, PostProcessor)."""
        env = self.env(data_dir=data_dir, ray_num_cpus=2, **settings)
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.pop("RAY_ADDRESS", None)  # never join a cluster that another test started
        # Its own process group, so that a test (and the teardown) can take down the whole node.
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "worker"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        worker = WorkerProc(proc, own_group=True)
        worker.pump = threading.Thread(target=worker._pump, daemon=True)
        worker.pump.start()
        self.workers.append(worker)
        worker.wait_for_line("svd-serve worker ready", RAY_READY_TIMEOUT_S)
        return worker

    async def submit(self, priority: Priority = Priority.NORMAL, attempts: int = 3, **metadata: Any) -> str:
        """What the ingress does on a 202: the row, then the queue entry."""
        job_id = str(uuid.uuid4())
        await self.jobs.create(
            job_id=job_id, owner_id=self.owner, image_url=f"local://{self.owner}/{job_id}/input.png",
            params=PARAMS, model="tiny-random", priority=priority,
            metadata=metadata, webhook_url=self.receiver.url, max_attempts=attempts,
        )
        await self.queue.add(QueuedJob(job_id=job_id, owner_id=self.owner), priority=priority,
                             attempts=attempts, backoff_ms=50)
        return job_id

    async def wait_terminal(self, job_ids: list[str], timeout_s: float) -> dict[str, JobRecord]:
        deadline = time.monotonic() + timeout_s
        while True:
            records = {jid: await self.jobs.get(jid) for jid in job_ids}
            if all(r is not None and r.status.terminal for r in records.values()):
                return {jid: r for jid, r in records.items() if r is not None}
            if time.monotonic() > deadline:
                states = {jid: (r.status.value, r.stage, r.attempts, r.error_code) if r else None
                          for jid, r in records.items()}
                logs = "".join(line for w in self.workers for line in w.lines[-20:])
                raise TimeoutError(f"jobs not finished within {timeout_s} s: {states}, "
                                   f"queue {await self.queue.counts()}\n{logs}")
            await asyncio.sleep(0.1)  # polling the store, bounded by the deadline

    async def wait_webhooks(self, job_id: str, count: int, timeout_s: float) -> set[tuple[str, str]]:
        deadline = time.monotonic() + timeout_s
        while len(self.receiver.for_job(job_id)) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling the receiver, bounded by the deadline
        return self.receiver.for_job(job_id)

    def runs(self) -> dict[str, list[int]]:
        """job id -> pids of the processes that ran it, in order."""
        out: dict[str, list[int]] = {}
        if self.run_log.exists():
            for line in self.run_log.read_text().splitlines():
                job_id, pid = line.split()
                out.setdefault(job_id, []).append(int(pid))
        return out


@pytest.fixture(scope="session")
def faults_database_url(pg_database_url: str) -> str:
    upgrade(pg_database_url)
    return pg_database_url


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


@pytest.fixture
async def stack(faults_database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path,
                receiver: WebhookReceiver) -> AsyncIterator[FaultStack]:
    engine = make_engine(faults_database_url)
    queue = JobQueue(redis_url, unique_prefix)
    fault_stack = FaultStack(faults_database_url, redis_url, unique_prefix, f"faults-{unique_prefix}",
                             tmp_path / "runs.log", receiver, JobRepository(make_session_factory(engine)), queue)
    try:
        yield fault_stack
    finally:
        for ingress in fault_stack.ingresses:
            if ingress.proc.poll() is None:
                ingress.proc.kill()
            ingress.proc.wait(timeout=10)
        for worker in fault_stack.workers:
            if worker.own_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.proc.pid, signal.SIGKILL)  # Ray's processes too
            elif worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait(timeout=10)
            worker.close()
        await queue.obliterate()
        await queue.close()
        await engine.dispose()
