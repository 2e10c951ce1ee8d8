"""A loopback HTTP proxy in front of the live stack that can fail the way networks fail: it cuts
a Server-Sent Events stream after its first event, or drops the answer to a submit after the
service has accepted it. It records every request it forwards, so a test can check what a
client sent on its retries (`Last-Event-ID`, `Idempotency-Key`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    body: bytes = b""


@dataclass
class CuttingProxy:
    upstream: str
    url: str = ""
    cut_events: int = 0  # cut this many event streams, each right after its first event
    drop_submits: int = 0  # drop this many submit answers (the service did accept them)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, method: str, path_part: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and path_part in s.path]

    def take(self, what: str) -> bool:
        with self.lock:
            if getattr(self, what) > 0:
                setattr(self, what, getattr(self, what) - 1)
                return True
            return False


def _handler(proxy: CuttingProxy, upstream: httpx.Client) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            self.close_connection = True
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            proxy.seen.append(seen)
            request = upstream.build_request(self.command, self.path, headers=headers, content=body)
            response = upstream.send(request, stream=True)
            try:
                seen.status = response.status_code
                if self.path.endswith("/events") and response.status_code == 200:
                    self._stream(response, cut=proxy.take("cut_events"))
                    return
                seen.body = response.read()
                if self.command == "POST" and self.path.rstrip("/").endswith("/animate-image") \
                        and proxy.take("drop_submits"):
                    return  # accepted upstream; the client gets a closed connection instead
                self._head(response, {"content-length": str(len(seen.body))})
                self.wfile.write(seen.body)
            finally:
                response.close()

        def _head(self, response: httpx.Response, extra: dict[str, str]) -> None:
            self.send_response(response.status_code)
            for key, value in response.headers.multi_items():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            for key, value in {**extra, "connection": "close"}.items():
                self.send_header(key, value)
            self.end_headers()

        def _stream(self, response: httpx.Response, cut: bool) -> None:
            self._head(response, {"transfer-encoding": "chunked"})
            buffer = ""
            for text in response.iter_text():
                if cut:
                    buffer += text
                    start = buffer.find("id:")
                    end = buffer.find("\n\n", start) if start >= 0 else -1
                    if end < 0:
                        continue
                    self._chunk(buffer[: end + 2].encode())
                    return  # the first event went out: drop the connection mid-stream
                self._chunk(text.encode())
            self.wfile.write(b"0\r\n\r\n")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        do_GET = do_POST = do_DELETE = _forward  # noqa: N815

    return Handler


@contextmanager
def cutting_proxy(upstream_url: str) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(upstream_url)
    with httpx.Client(base_url=upstream_url, timeout=httpx.Timeout(30, read=None)) as upstream:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy, upstream))
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            yield proxy
        finally:
            server.shutdown()
            server.server_close()
