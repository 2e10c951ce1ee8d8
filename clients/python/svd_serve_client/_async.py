"""The asynchronous client: `AsyncClient` and its `AsyncJob` handle, the sync API with `await`.

Only the I/O differs from `_sync`: building requests, retry decisions, checksums and the data
types come from `_wire` and `_types`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

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

AsyncEventCallback = Callable[[Event], "Awaitable[None] | None"]


class AsyncClient:
    """`Client` for asyncio: the same methods, each a coroutine (`events()` an async iterator)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 2, max_retry_wait_s: float = 60.0,
                 http_client: httpx.AsyncClient | None = None):
        self.config = Config.resolve(base_url, api_key, timeout, max_retries, max_retry_wait_s)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._http.headers.update(self.config.headers())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> httpx.Response:
        url = self.config.base_url + path
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, url, **kwargs)
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
            await asyncio.sleep(delay)
            attempt += 1

    async def submit(self, image: ImageInput, *, idempotency_key: str | None = None, **options: Any) -> AsyncJob:
        request = _wire.submit_request(image, options)
        key = idempotency_key or _wire.new_idempotency_key()
        response = await self._request("POST", API, headers={"Idempotency-Key": key}, **request)
        return AsyncJob(self, JobInfo.from_json(response.json()), idempotency_key=key)

    async def run(self, image: ImageInput, *, timeout: float = 600.0, on_event: AsyncEventCallback | None = None,
                  **options: Any) -> JobInfo:
        job = await self.submit(image, **options)
        return await job.wait(timeout=timeout, on_event=on_event)

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, JobInfo(id=job_id, status="unknown"))

    async def status(self, job_id: str) -> JobInfo:
        return JobInfo.from_json((await self._request("GET", f"{API}/status/{job_id}")).json())

    async def cancel(self, job_id: str) -> JobInfo:
        return JobInfo.from_json((await self._request("DELETE", f"{API}/{job_id}")).json())

    async def retry(self, job_id: str) -> AsyncJob:
        response = await self._request("POST", f"{API}/{job_id}/retry", idempotent=False)
        return AsyncJob(self, JobInfo.from_json(response.json()))

    async def list(self, *, limit: int = 20, cursor: str | None = None, status: str | None = None) -> JobPage:
        params = {k: v for k, v in (("limit", limit), ("cursor", cursor), ("status", status)) if v is not None}
        body = (await self._request("GET", API, params=params)).json()
        return JobPage([JobInfo.from_json(j) for j in body["jobs"]], body.get("nextCursor"))

    async def iter_jobs(self, *, status: str | None = None, page_size: int = 50) -> AsyncIterator[JobInfo]:
        cursor = None
        while True:
            page = await self.list(limit=page_size, cursor=cursor, status=status)
            for job in page.jobs:
                yield job
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def events(self, job_id: str, *, last_event_id: str | None = None,
                     max_reconnects: int = 5) -> AsyncIterator[Event]:
        """See `Client.events`: resumed with `Last-Event-ID` after a dropped connection."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            url = f"{self.config.base_url}{API}/{job_id}/events"
            try:
                async with aconnect_sse(self._http, "GET", url, headers=headers,
                                        timeout=httpx.Timeout(self.config.timeout, read=None)) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise APIStatusError.from_response(source.response)
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        event = Event.from_sse(sse.id, sse.event, sse.data)
                        last_event_id, failures = event.id or last_event_id, 0
                        yield event
                        if event.terminal:
                            return
            except (httpx.TransportError, SSEError) as exc:
                failures += 1
                if failures > max_reconnects:
                    raise APIConnectionError(f"events of job {job_id}: {exc or type(exc).__name__}") from exc
                await asyncio.sleep(min(5.0, 0.25 * 2**failures))

    async def wait(self, job_id: str, *, timeout: float = 600.0,
                   on_event: AsyncEventCallback | None = None) -> JobInfo:
        async def follow() -> None:
            events = self.events(job_id)
            try:
                async for event in events:
                    if on_event is not None:
                        result = on_event(event)
                        if asyncio.iscoroutine(result):
                            await result
            finally:
                await events.aclose()  # type: ignore[attr-defined]

        try:
            await asyncio.wait_for(follow(), timeout)
        except asyncio.TimeoutError:
            pass  # the status below says how far it got
        info = await self.status(job_id)
        if info.status == "completed":
            return info
        if info.done:
            raise JobFailed(info)
        raise JobTimeout(f"job {job_id} still {info.status} after {timeout:.0f} s")

    async def download(self, job: str | JobInfo, dest: str | Path, *, output: str = "mp4") -> Path:
        info = job if isinstance(job, JobInfo) and job.outputs else await self.status(
            job if isinstance(job, str) else job.id)
        url = _wire.output_url(info, output)
        path = _wire.download_path(Path(dest), info.id, url)
        writer = _wire.ChecksumWriter(path, output, info.checksums.get(output))
        try:
            request = self._http.build_request("GET", url)
            _wire.strip_foreign_auth(request, self.config.base_url)
            response = await self._http.send(request, stream=True)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    raise APIStatusError.from_response(response)
                async for chunk in response.aiter_bytes():
                    writer.write(chunk)
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            writer.abort()
            raise APIConnectionError(f"download {output} of job {info.id}: {exc}") from exc
        except BaseException:
            writer.abort()
            raise
        return writer.finish()


class AsyncJob:
    """A submitted job, for asyncio: the methods of `Job`, awaited."""

    def __init__(self, client: AsyncClient, accepted: JobInfo, idempotency_key: str | None = None) -> None:
        self._client = client
        self.id = accepted.id
        self.accepted = accepted
        self.idempotency_key = idempotency_key

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobInfo:
        return await self._client.status(self.id)

    async def wait(self, *, timeout: float = 600.0, on_event: AsyncEventCallback | None = None) -> JobInfo:
        return await self._client.wait(self.id, timeout=timeout, on_event=on_event)

    async def cancel(self) -> JobInfo:
        return await self._client.cancel(self.id)

    def events(self, *, last_event_id: str | None = None) -> AsyncIterator[Event]:
        return self._client.events(self.id, last_event_id=last_event_id)

    async def download(self, dest: str | Path, *, output: str = "mp4") -> Path:
        return await self._client.download(self.id, dest, output=output)

    async def retry(self) -> AsyncJob:
        return await self._client.retry(self.id)
