"""A webhook receiver on loopback (a real HTTP server in a thread) that answers from a script and
checks every request with the `standardwebhooks` reference verifier."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

# An answer: a status code, or (status code, extra headers).
Answer = int | tuple[int, dict[str, str]]


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified_by: list[str]  # the secrets (by name) whose reference verifier accepted it


@dataclass
class Receiver:
    """Answers requests with `script` in order, then `default`; `hang` (when set) holds every
    answer until it is released."""

    secrets: dict[str, str]
    script: list[Answer] = field(default_factory=list)
    default: Answer = 200
    hang: threading.Event | None = None
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, headers: dict[str, str], body: bytes) -> Answer:
        verified = []
        for name, secret in self.secrets.items():
            try:
                Webhook(secret).verify(body, headers)
                verified.append(name)
            except WebhookVerificationError:
                pass
        with self._lock:
            self.received.append(Received(headers, body, verified))
            return self.script.pop(0) if self.script else self.default

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [r.headers["webhook-id"] for r in self.received]


@contextmanager
def running_receiver(receiver: Receiver, path: str = "/hook") -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            answer = receiver.answer({k.lower(): v for k, v in self.headers.items()}, body)
            if receiver.hang is not None:
                receiver.hang.wait(timeout=30)
            status, extra = (answer, {}) if isinstance(answer, int) else answer
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            try:
                self.wfile.write(b"ok")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the sender gave up waiting (a timeout test)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        yield receiver
    finally:
        if receiver.hang is not None:
            receiver.hang.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
