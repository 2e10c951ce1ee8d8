"""The synchronous client: `Client` and the `Job` handle that `submit()` returns."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from svd_serve_client import _wire
from svd_serve_client._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    JobFailed,
    JobTimeout,
)
from svd_serve_client._types import Event, JobInfo, JobPage
from svd_serve_client._wire import API, Config, ImageInput

EventCallback = Callable[[Event], None]


class Client:
    """A pooled connection to one svd-serve; use it as a context manager or `close()` it.

    `base_url` and `api_key` default to `SVD_SERVE_URL` and `SVD_SERVE_API_KEY`. Requests that
    fail with a transport error or 429/502/503/504 are retried `max_retries` times (after
    `Retry-After` when given, unless it exceeds `max_retry_wait_s`)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 2, max_retry_wait_s: float = 60.0, http_client: httpx.Client | None = None):
        self.config = Config.resolve(base_url, api_key, timeout, max_retries, max_retry_wait_s)
        self._http = http_client or httpx.Client(timeout=timeout)
        self._http.headers.update(self.config.headers())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- requests ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> httpx.Response:
        url = self.config.base_url + path
        attempt = 0
        while True:
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TimeoutException as exc:
                error: APIConnectionError = APITimeoutError(f"{method} {url}: timed out ({exc})")
                response = None
            except httpx.TransportError as exc:
                error = APIConnectionError(f"{method} {url}: {exc or type(exc).__name__}")
                response = None
            if response is not None and response.status_code < 400:
                return response
            delay = _wire.retry_delay(attempt, response, self.config, idempotent=idempotent)
            if delay is None:
                if response is None:
                    raise error
                raise APIStatusError.from_response(response)
            time.sleep(delay)
            attempt += 1

    def submit(self, image: ImageInput, *, idempotency_key: str | None = None, **options: Any) -> Job:
        """Submit an image (path, bytes, binary file or http(s) URL) with the API's options in
        snake_case (`num_frames`, `seed`, `outputs=["mp4", "webm"]`, ...). Every submit carries
        an Idempotency-Key (`idempotency_key`, or a new one), sent again on its own retries, so a
        retried submit never makes a second job."""
        request = _wire.submit_request(image, options)
        key = idempotency_key or _wire.new_idempotency_key()
        response = self._request("POST", API, headers={"Idempotency-Key": key}, **request)
        return Job(self, JobInfo.from_json(response.json()), idempotency_key=key)

    def run(self, image: ImageInput, *, timeout: float = 600.0, on_event: EventCallback | None = None,
            **options: Any) -> JobInfo:
        """Submit and wait: the completed job's status, or `JobFailed` / `JobTimeout`."""
        return self.submit(image, **options).wait(timeout=timeout, on_event=on_event)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (no request is made)."""
        return Job(self, JobInfo(id=job_id, status="unknown"))

    def status(self, job_id: str) -> JobInfo:
        return JobInfo.from_json(self._request("GET", f"{API}/status/{job_id}").json())

    def cancel(self, job_id: str) -> JobInfo:
        return JobInfo.from_json(self._request("DELETE", f"{API}/{job_id}").json())

    def retry(self, job_id: str) -> Job:
        """Re-run a job that ended `error` or `canceled` as a new job (its `retry_of` is `job_id`)."""
        response = self._request("POST", f"{API}/{job_id}/retry", idempotent=False)
        return Job(self, JobInfo.from_json(response.json()))

    def list(self, *, limit: int = 20, cursor: str | None = None, status: str | None = None) -> JobPage:
        """One page of your jobs, newest first."""
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("status", status)) if v is not None}
        body = self._request("GET", API, params=params).json()
        return JobPage([JobInfo.from_json(j) for j in body["jobs"]], body.get("nextCursor"))

    def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> Iterator[JobInfo]:
        """Every job of yours, page after page."""
        cursor = None
        while True:
            page = self.list(limit=page_size, cursor=cursor, status=status)
            yield from page.jobs
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    # --- events and waiting -------------------------------------------------------------------

    def events(self, job_id: str, *, last_event_id: str | None = None, max_reconnects: int = 5,
               _until: float | None = None) -> Iterator[Event]:
        """The job's events until its terminal one. A dropped connection is resumed with
        `Last-Event-ID`, so no event is lost or repeated; `max_reconnects` failures in a row
        (without an event between them) raise `APIConnectionError`. (`_until`, a monotonic
        deadline, ends the stream quietly: `wait()`'s timeout.)"""
        failures = 0
        timer: threading.Timer | None = None
        while _until is None or time.monotonic() < _until:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            url = f"{self.config.base_url}{API}/{job_id}/events"
            try:
                # No read timeout: the server sends a heartbeat comment every 15 s.
                with connect_sse(self._http, "GET", url, headers=headers,
                                 timeout=httpx.Timeout(self.config.timeout, read=None)) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise APIStatusError.from_response(source.response)
                    if _until is not None:
                        # A quiet stream (heartbeats only) never returns to us: close it at the deadline.
                        timer = threading.Timer(max(0.0, _until - time.monotonic()), source.response.close)
                        timer.daemon = True
                        timer.start()
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue  # the `retry:` preamble
                        event = Event.from_sse(sse.id, sse.event, sse.data)
                        last_event_id, failures = event.id or last_event_id, 0
                        yield event
                        if event.terminal:
                            return
            except (httpx.TransportError, httpx.StreamError, SSEError) as exc:
                if _until is not None and time.monotonic() >= _until:
                    return
                failures += 1
                if failures > max_reconnects:
                    raise APIConnectionError(f"events of job {job_id}: {exc or type(exc).__name__}") from exc
                time.sleep(min(5.0, 0.25 * 2**failures))
            finally:
                if timer is not None:
                    timer.cancel()

    def wait(self, job_id: str, *, timeout: float = 600.0, on_event: EventCallback | None = None) -> JobInfo:
        """Follow the job's events until it ends; the completed status, or `JobFailed` (ended
        `error`/`canceled`) or `JobTimeout` (the job goes on)."""
        deadline = time.monotonic() + timeout
        for event in self.events(job_id, _until=deadline):
            if on_event is not None:
                on_event(event)
            if time.monotonic() >= deadline:
                break
        info = self.status(job_id)
        if info.status == "completed":
            return info
        if info.done:
            raise JobFailed(info)
        raise JobTimeout(f"job {job_id} still {info.status} after {timeout:.0f} s")

    # --- downloads ----------------------------------------------------------------------------

    def download(self, job: str | JobInfo, dest: str | Path, *, output: str = "mp4") -> Path:
        """Download one output of a completed job to `dest` (a file, or a directory to put
        `<job id><ext>` in), verifying its SHA-256 against the job's `checksums`."""
        info = job if isinstance(job, JobInfo) and job.outputs else self.status(job if isinstance(job, str) else job.id)
        url = _wire.output_url(info, output)
        path = _wire.download_path(Path(dest), info.id, url)
        writer = _wire.ChecksumWriter(path, output, info.checksums.get(output))
        try:
            request = self._http.build_request("GET", url)
            _wire.strip_foreign_auth(request, self.config.base_url)
            response = self._http.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    response.read()
                    raise APIStatusError.from_response(response)
                for chunk in response.iter_bytes():
                    writer.write(chunk)
            finally:
                response.close()
        except httpx.TransportError as exc:
            writer.abort()
            raise APIConnectionError(f"download {output} of job {info.id}: {exc}") from exc
        except BaseException:
            writer.abort()
            raise
        return writer.finish()


class Job:
    """A submitted job: `status()`, `wait()`, `cancel()`, `events()`, `download()`, `retry()`."""

    def __init__(self, client: Client, accepted: JobInfo, idempotency_key: str | None = None) -> None:
        self._client = client
        self.id = accepted.id
        self.accepted = accepted
        self.idempotency_key = idempotency_key

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobInfo:
        return self._client.status(self.id)

    def wait(self, *, timeout: float = 600.0, on_event: EventCallback | None = None) -> JobInfo:
        return self._client.wait(self.id, timeout=timeout, on_event=on_event)

    def cancel(self) -> JobInfo:
        return self._client.cancel(self.id)

    def events(self, *, last_event_id: str | None = None) -> Iterator[Event]:
        return self._client.events(self.id, last_event_id=last_event_id)

    def download(self, dest: str | Path, *, output: str = "mp4") -> Path:
        return self._client.download(self.id, dest, output=output)

    def retry(self) -> Job:
        return self._client.retry(self.id)
