"""`svd-serve up` as someone runs it, on a port of their choosing and a data directory that
outlives it: the links in webhook payloads answer, a restart says "up" only once this run's
worker is ready, and a worker that dies is started again. Real processes all the way (private
Redis, SQLite, Ray, ingress); every wait is on a state (an output line, a webhook, an answer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving.local_stack import free_port
from serving.worker.process import READY_LINE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"
SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD3CUf1w/Iw6s="
START_TIMEOUT_S = 420.0  # Ray and the Serve app on two busy cores
JOB_TIMEOUT_S = 180.0


class Receiver:
    """A webhook receiver on loopback: keeps every body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.got_one = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                outer.got_one.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Up:
    """One `svd-serve up` process and what it printed."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    worker_pids: list[int] = field(default_factory=list)
    reader: threading.Thread | None = None

    def pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("svd-serve up: worker ") and "(pid " in line:
                self.worker_pids.append(int(line.split("(pid ", 1)[1].split(",")[0].rstrip(")\n")))

    def wait_for(self, predicate: Callable[[str], bool], timeout_s: float = START_TIMEOUT_S, after: int = 0) -> int:
        """The index of the first line from `after` on that satisfies `predicate`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index in range(after, len(self.lines)):
                if predicate(self.lines[index]):
                    return index
            if self.proc.poll() is not None:
                raise AssertionError(f"`up` exited with {self.proc.returncode}:\n{''.join(self.lines[-60:])}")
            time.sleep(0.1)  # polling the child's output, bounded by the deadline
        raise AssertionError(f"no such line within {timeout_s} s:\n{''.join(self.lines[-60:])}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in self.worker_pids:  # a worker group `up` could not take down must not outlive the test
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.reader is not None:
            self.reader.join(timeout=30)  # ends at EOF, once `up` and its children are gone
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[[int], Up]]:
    started: list[Up] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVD_SERVE_") and k not in ("REDIS_URL", "RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", SVD_SERVE_WEBHOOK_SECRETS=SECRET, SVD_SERVE_ALLOW_PRIVATE_URLS="true",
               SVD_SERVE_WEBHOOK_POLL_INTERVAL_S="0.1", SVD_SERVE_RAY_NUM_CPUS="2")

    def start(port: int) -> Up:
        proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "up", "--port", str(port)], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        up = Up(proc)
        up.reader = threading.Thread(target=up.pump, daemon=True)
        up.reader.start()
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            up.stop()


def submit(base: str, **fields: str) -> str:
    with SAMPLE.open("rb") as image:
        response = httpx.post(f"{base}/api/v1/animate-image", files={"image": ("sample.png", image, "image/png")},
                              data={"numFrames": "8", "width": "128", "height": "64", **fields}, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["jobId"])


def wait_completed(base: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = httpx.get(f"{base}/api/v1/animate-image/status/{job_id}", timeout=10).json()
        if status["status"] in ("completed", "error", "canceled"):
            return status
        time.sleep(0.2)  # polling the job's state, bounded by the deadline
    raise AssertionError(f"job {job_id} did not end: {status}")


def consumers(base: str) -> int | None:
    ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 200
    return ready.json()["worker"]["consumers"]


@pytest.mark.timeout(1500)
def test_up_on_its_own_port_restarted_and_with_a_dying_worker(start_up: Callable[[int], Up], tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker_log = tmp_path / ".svd-serve" / "worker.log"
    receiver = Receiver()
    try:
        # 1. Under `up --port P`, the links in a webhook payload (written by the worker) answer.
        first = start_up(port)
        first.wait_for(lambda line: line.startswith("svd-serve is up at"))
        job_id = submit(base, webhookUrl=receiver.url)
        assert wait_completed(base, job_id)["status"] == "completed"
        assert receiver.got_one.wait(timeout=JOB_TIMEOUT_S), "no webhook arrived"
        data = receiver.bodies[0]["data"]
        for name in ("statusUrl", "eventsUrl", "resultUrl"):
            assert data[name].startswith(f"{base}/"), (name, data[name])
        assert httpx.get(data["statusUrl"], timeout=10).json()["jobId"] == job_id
        with httpx.stream("GET", data["eventsUrl"], timeout=30) as events:
            assert events.status_code == 200 and "event: completed" in events.read().decode()
        video = httpx.get(data["resultUrl"], timeout=30)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        first.stop()
        assert worker_log.read_bytes().count(READY_LINE.encode()) == 1

        # 2. Started again on the same data directory (worker.log already holds a ready line):
        #    "up" only once this run's worker is ready.
        second = start_up(port)
        up_at = second.wait_for(lambda line: line.startswith("svd-serve is up at"))
        assert worker_log.read_bytes().count(READY_LINE.encode()) == 2, "said up before its worker was ready"
        assert second.wait_for(lambda line: "worker started (pid" in line) < up_at

        # 3. The worker dies: `up` says so, starts it again, and jobs run once it is back.
        deadline = time.monotonic() + 60
        while consumers(base) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the dispatcher names its connections just after it starts
        assert consumers(base) == 1
        os.killpg(second.worker_pids[-1], signal.SIGKILL)  # the worker of this run (a start may have been retried)
        died = second.wait_for(lambda line: line.startswith("svd-serve up: worker exited"), timeout_s=60, after=up_at)
        back = second.wait_for(lambda line: line.startswith("svd-serve up: worker ready again"), after=died)
        assert any("worker restarted" in line for line in second.lines[died:back])
        assert worker_log.read_bytes().count(READY_LINE.encode()) == 3
        assert wait_completed(base, submit(base))["status"] == "completed"
        assert consumers(base) == 1
    finally:
        receiver.close()
