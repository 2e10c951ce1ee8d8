"""A loopback server speaking Runway's documented REST contract (API version 2024-11-06), for the
real `runwayml` SDK to talk to through its `base_url`.

- `POST /v1/image_to_video` creates a task (`{"id", "estimatedCost"}`), validating model, ratio,
  duration, seed, promptImage and promptText like the API does (400 otherwise).
- `GET /v1/tasks/{id}` answers the task; each read moves it one step along its script
  (PENDING -> THROTTLED -> RUNNING -> SUCCEEDED by default), so tests advance it without clocks.
  SUCCEEDED carries `output` URLs that expire (403 once expired; a new read issues fresh ones),
  FAILED carries `failure` and `failureCode`, terminal tasks carry `cost.credits`.
- `DELETE /v1/tasks/{id}` cancels or deletes a task (204).
- `GET /v1/organization` is the account (used as a health check).
Every call needs `Authorization: Bearer <key>` (401) and `X-Runway-Version: 2024-11-06` (400).
Scripted 429/5xx answers come from `fail_creates` / `fail_polls`.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from serving import media

API_VERSION = "2024-11-06"
RATIOS = {
    "gen4_turbo": {"1280:720", "720:1280", "1104:832", "832:1104", "960:960", "1584:672"},
    "gen3a_turbo": {"1280:768", "768:1280"},
}
DURATIONS = {5, 10}
CREDITS_PER_SECOND = 5
DEFAULT_SCRIPT = ("PENDING", "THROTTLED", "RUNNING", "SUCCEEDED")


def sample_video(num_frames: int = 12, size: int = 64, fps: int = 24) -> bytes:
    """A small real H.264 MP4: what a finished task's output URL returns."""
    ramp = np.linspace(0, 255, num_frames, dtype=np.uint8)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = ramp[:, None, None, None]
    return media.encode_mp4(frames, fps)


@dataclass
class FakeTask:
    id: str
    body: dict[str, Any]
    script: list[str]
    failure_code: str | None = None
    step: int = -1
    deleted: bool = False
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    @property
    def status(self) -> str:
        if self.deleted:
            return "CANCELLED"
        return self.script[max(0, min(self.step, len(self.script) - 1))]

    @property
    def credits(self) -> int:
        return int(self.body.get("duration", 5)) * CREDITS_PER_SECOND


@dataclass
class FakeRunway:
    """State and knobs of the fake; `base_url` is set once it listens."""

    api_key: str = "key_fake_runway_secret"
    base_url: str = ""
    video: bytes = field(default_factory=sample_video)
    script: tuple[str, ...] = DEFAULT_SCRIPT
    failure_code: str = "SAFETY.INPUT.IMAGE"
    failed_credits: int = 0  # what a FAILED task still charges (Runway refunds most failures)
    fail_creates: list[int] = field(default_factory=list)  # status codes answered to the next creates
    fail_polls: list[int] = field(default_factory=list)  # ... and to the next task reads
    expire_next_outputs: int = 0  # this many SUCCEEDED reads hand out already-expired URLs
    healthy: bool = True
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every call
    create_attempts: int = 0  # POSTs to /v1/image_to_video, failed ones included
    deletes: list[str] = field(default_factory=list)
    downloads: list[int] = field(default_factory=list)  # status code of every output GET
    _tokens: dict[str, str] = field(default_factory=dict)  # valid output token -> task id
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, method: str, prefix: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    # Request handling (called on the server's threads, under the lock) -----------------------
    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        with self.lock:
            path = urlsplit(target).path
            self.requests.append((method, path))
            if method == "GET" and path.startswith("/outputs/"):
                return self._download(target)
            if headers.get("authorization") != f"Bearer {self.api_key}":
                return _json(401, {"error": "Invalid API key"})
            if headers.get("x-runway-version") != API_VERSION:
                return _json(400, {"error": f"X-Runway-Version must be {API_VERSION}"})
            if method == "POST" and path == "/v1/image_to_video":
                return self._create(body)
            if path.startswith("/v1/tasks/"):
                task = self.tasks.get(path.removeprefix("/v1/tasks/"))
                if task is None:
                    return _json(404, {"error": "Task not found"})
                if method == "GET":
                    return self._read(task)
                if method == "DELETE":
                    task.deleted = True
                    self.deletes.append(task.id)
                    return 204, {}, b""
            if method == "GET" and path == "/v1/organization":
                if not self.healthy:
                    return _json(503, {"error": "Service unavailable"})
                return _json(200, {"creditBalance": 1000, "tier": {"maxMonthlyCreditSpend": 100000, "models": {}}})
            return _json(404, {"error": "Not found"})

    def _create(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.create_attempts += 1
        if self.fail_creates:
            return _error(self.fail_creates.pop(0))
        try:
            data = json.loads(body)
        except ValueError:
            return _json(400, {"error": "Invalid JSON"})
        problem = _validate(data)
        if problem:
            return _json(400, {"error": problem})
        task = FakeTask(str(uuid.uuid4()), data, list(self.script), self.failure_code)
        self.tasks[task.id] = task
        return _json(200, {"id": task.id, "estimatedCost": {"credits": task.credits}})

    def _read(self, task: FakeTask) -> tuple[int, dict[str, str], bytes]:
        if self.fail_polls:
            return _error(self.fail_polls.pop(0))
        if not task.deleted:
            task.step += 1
        status = task.status
        answer: dict[str, Any] = {"id": task.id, "status": status, "createdAt": task.created_at}
        if status in ("PENDING", "THROTTLED", "RUNNING"):
            answer["estimatedCost"] = {"credits": task.credits}
        else:
            charged = {"CANCELLED": 0, "FAILED": self.failed_credits}.get(status, task.credits)
            answer["cost"] = {"credits": charged}
        if status == "RUNNING":
            answer["progress"] = 0.5
        elif status == "SUCCEEDED":
            token = secrets.token_hex(8)
            if self.expire_next_outputs > 0:
                self.expire_next_outputs -= 1  # handed out, but already past its expiry
            else:
                self._tokens[token] = task.id
            answer["output"] = [f"{self.base_url}/outputs/{task.id}.mp4?_jwt={token}"]
        elif status == "FAILED":
            answer["failure"] = "The input image was flagged by content moderation."
            answer["failureCode"] = task.failure_code
        return _json(200, answer)

    def _download(self, target: str) -> tuple[int, dict[str, str], bytes]:
        token = parse_qs(urlsplit(target).query).get("_jwt", [""])[0]
        if token not in self._tokens:
            self.downloads.append(403)
            return 403, {"Content-Type": "application/xml"}, b"<Error><Code>AccessDenied</Code></Error>"
        self.downloads.append(200)
        return 200, {"Content-Type": "video/mp4"}, self.video


def _validate(data: dict[str, Any]) -> str | None:
    model = data.get("model")
    if model not in RATIOS:
        return f"model must be one of {sorted(RATIOS)}"
    if data.get("ratio") not in RATIOS[model]:
        return f"ratio must be one of {sorted(RATIOS[model])}"
    if "duration" in data and data["duration"] not in DURATIONS:
        return "duration must be 5 or 10"
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or not 0 <= seed <= 4294967295:
        return "seed must be an integer between 0 and 4294967295"
    image = data.get("promptImage")
    if not isinstance(image, str) or not (image.startswith("https://") or image.startswith("data:image/")):
        return "promptImage must be an HTTPS URL or a data URI"
    text = data.get("promptText")
    if text is not None and (not isinstance(text, str) or not 0 < len(text) <= 1000):
        return "promptText must be a non-empty string of at most 1000 characters"
    return None


def _json(status: int, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _error(status: int) -> tuple[int, dict[str, str], bytes]:
    message = "Too many requests" if status == 429 else "Internal server error"
    return _json(status, {"error": message})


@contextmanager
def running_fake_runway(fake: FakeRunway | None = None) -> Iterator[FakeRunway]:
    """Serve `fake` on 127.0.0.1 on a free port for the duration of the block."""
    state = fake or FakeRunway()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, payload = state.handle(self.command, self.path, headers, body)
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _serve  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
