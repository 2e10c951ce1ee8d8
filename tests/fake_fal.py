"""A loopback server speaking fal's documented queue REST contract (https://queue.fal.run), for
the real `fal-client` SDK to talk to (docs: fal.ai/docs/documentation/model-apis/inference/queue).

- `POST /{owner}/{alias}[/{path}]` (optionally `?fal_webhook=<url>`) queues a request and answers
  `{request_id, response_url, status_url, cancel_url, queue_position}`. The input is checked
  against Pika v2.2 image-to-video's schema (`image_url` and `prompt` required, `duration` 5|10,
  `resolution` 720p|1080p): 422 with a `detail` list otherwise.
- `GET /{owner}/{alias}/requests/{id}/status` answers the status; each read moves the request
  one step along its script (IN_QUEUE with a falling `queue_position`, IN_PROGRESS, COMPLETED),
  so tests advance it without clocks. A failed request is COMPLETED with `error`/`error_type`.
  Status and result paths omit the model's sub-path, as fal's do.
- `GET /{owner}/{alias}/requests/{id}` answers the result, `{"video": {"url", ...}}`, once
  COMPLETED (400 before; 422 with `detail` for a failed request).
- `PUT /{owner}/{alias}/requests/{id}/cancel`: 202 `CANCELLATION_REQUESTED` while queued or in
  progress, 400 `ALREADY_COMPLETED` after.
- When a request completes and it named a webhook, the fake POSTs fal's callback body
  (`{request_id, gateway_request_id, status: OK|ERROR, payload|error}`) there, as fal does.
Every queue call needs `Authorization: Key <key>` (401).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from tests.fake_runway import sample_video

DEFAULT_SCRIPT = ("IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "COMPLETED")


@dataclass
class FakeRequest:
    id: str
    app: str  # "{owner}/{alias}": where its status and result live
    body: dict[str, Any]
    webhook: str | None
    script: list[str]
    reads: int = 0
    canceled: bool = False
    webhook_answers: list[int] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.script[min(self.reads, len(self.script) - 1)]


@dataclass
class FakeFal:
    """State and knobs of the fake; `base_url` is set once it listens."""

    api_key: str = "fal_fake_key_id:fal_fake_secret"
    base_url: str = ""
    video: bytes = field(default_factory=sample_video)
    script: tuple[str, ...] = DEFAULT_SCRIPT
    error: str | None = None  # set: requests complete failed with this error ...
    error_type: str = "content_policy_violation"  # ... and this type
    fail_submits: list[int] = field(default_factory=list)  # status codes answered to the next submits
    hold: threading.Event = field(default_factory=threading.Event)  # cleared: reads do not advance
    requests: dict[str, FakeRequest] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every call
    submits: int = 0
    cancels: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.hold.set()

    def count(self, method: str, suffix: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.calls if m == method and p.endswith(suffix))

    def finish(self, request_id: str) -> None:
        """Complete a request now (as fal's runner would) and send its callback."""
        with self.lock:
            request = self.requests[request_id]
            request.script = ["COMPLETED"]
            request.reads = 0
        self._callback(request)

    # Request handling (on the server's threads) ------------------------------------------------
    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        url = urlsplit(target)
        path = url.path
        with self.lock:
            self.calls.append((method, path))
        if method == "GET" and path.startswith("/files/"):
            return 200, self.video
        if headers.get("authorization") != f"Key {self.api_key}":
            return _json(401, {"detail": "Unauthorized"})
        parts = path.strip("/").split("/")
        if "requests" in parts:
            at = parts.index("requests")
            request = self.requests.get(parts[at + 1]) if len(parts) > at + 1 else None
            if request is None or request.app != "/".join(parts[:at]):
                return _json(404, {"detail": "Request not found"})
            rest = parts[at + 2:]
            if method == "GET" and rest == ["status"]:
                return self._status(request)
            if method == "GET" and rest == []:
                return self._result(request)
            if method == "PUT" and rest == ["cancel"]:
                return self._cancel(request)
            return _json(405, {"detail": "Method not allowed"})
        if method == "POST" and len(parts) >= 2:
            webhook = parse_qs(url.query).get("fal_webhook", [None])[0]
            return self._submit("/".join(parts[:2]), body, webhook)
        return _json(404, {"detail": "Not found"})

    def _submit(self, app: str, body: bytes, webhook: str | None) -> tuple[int, bytes]:
        with self.lock:
            self.submits += 1
            if self.fail_submits:
                return _json(self.fail_submits.pop(0), {"detail": "Internal server error"})
            try:
                data = json.loads(body)
            except ValueError:
                return _json(422, {"detail": [{"loc": ["body"], "msg": "invalid JSON", "type": "value_error"}]})
            problems = _validate(data)
            if problems:
                return _json(422, {"detail": problems})
            request = FakeRequest(str(uuid.uuid4()), app, data, webhook, list(self.script))
            self.requests[request.id] = request
        base = f"{self.base_url}/{app}/requests/{request.id}"
        return _json(200, {
            "request_id": request.id, "response_url": base, "status_url": base + "/status",
            "cancel_url": base + "/cancel", "queue_position": 0,
        })

    def _status(self, request: FakeRequest) -> tuple[int, bytes]:
        completed_now = False
        with self.lock:
            status = "COMPLETED" if request.canceled else request.status
            queued = request.script[request.reads:].count("IN_QUEUE")
            if self.hold.is_set() and request.reads < len(request.script) - 1:
                request.reads += 1
                completed_now = request.status == "COMPLETED"
        answer: dict[str, Any] = {"status": status, "request_id": request.id}
        if status == "IN_QUEUE":
            answer["queue_position"] = max(0, queued - 1)
        else:
            answer["logs"] = [{"message": "working", "level": "INFO", "timestamp": "2026-12-02T00:00:00Z"}]
        if status == "COMPLETED":
            answer["metrics"] = {"inference_time": 1.5}
            if request.canceled:
                answer.update(error="Request was cancelled", error_type="request_cancelled")
            elif self.error is not None:
                answer.update(error=self.error, error_type=self.error_type)
        if completed_now:
            self._callback(request)
        return _json(200, answer)

    def _result(self, request: FakeRequest) -> tuple[int, bytes]:
        if request.status != "COMPLETED" and not request.canceled:
            return _json(400, {"detail": "Request is still in progress"})
        if self.error is not None or request.canceled:
            return _json(422, {"detail": self.error or "Request was cancelled"})
        return _json(200, {"video": {
            "url": f"{self.base_url}/files/{request.id}.mp4", "content_type": "video/mp4",
            "file_name": "output.mp4", "file_size": len(self.video),
        }})

    def _cancel(self, request: FakeRequest) -> tuple[int, bytes]:
        with self.lock:
            self.cancels.append(request.id)
            if request.status == "COMPLETED" or request.canceled:
                return _json(400, {"status": "ALREADY_COMPLETED"})
            request.canceled = True
        return _json(202, {"status": "CANCELLATION_REQUESTED"})

    def _callback(self, request: FakeRequest) -> None:
        """fal's webhook: POSTed once the request completes (fal retries failed deliveries)."""
        if request.webhook is None:
            return
        body: dict[str, Any] = {"request_id": request.id, "gateway_request_id": request.id}
        if self.error is None:
            body.update(status="OK", payload={"video": {"url": f"{self.base_url}/files/{request.id}.mp4"}})
        else:
            body.update(status="ERROR", error=self.error, payload={"detail": [{"msg": self.error}]})
        answer = httpx.post(request.webhook, json=body, timeout=30)
        request.webhook_answers.append(answer.status_code)


def _validate(data: Any) -> list[dict[str, Any]]:
    """Pika v2.2 image-to-video's input schema, as fal documents it."""
    if not isinstance(data, dict):
        return [{"loc": ["body"], "msg": "must be an object", "type": "type_error"}]
    problems = []
    for name in ("image_url", "prompt"):
        if not isinstance(data.get(name), str) or not data[name]:
            problems.append({"loc": ["body", name], "msg": "field required", "type": "value_error.missing"})
    if data.get("duration", 5) not in (5, 10):
        problems.append({"loc": ["body", "duration"], "msg": "must be 5 or 10", "type": "value_error"})
    if data.get("resolution", "720p") not in ("720p", "1080p"):
        problems.append({"loc": ["body", "resolution"], "msg": "must be 720p or 1080p", "type": "value_error"})
    return problems


def _json(status: int, payload: Any) -> tuple[int, bytes]:
    return status, json.dumps(payload).encode()


@contextmanager
def running_fake_fal(fake: FakeFal | None = None) -> Iterator[FakeFal]:
    """Serve `fake` on 127.0.0.1 on a free port for the duration of the block."""
    state = fake or FakeFal()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload = state.handle(self.command, self.path, headers, body)
            self.send_response(status)
            self.send_header("Content-Type", "video/mp4" if self.path.startswith("/files/") else "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _serve  # noqa: N815

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
