"""fal as a `ProviderBackend`, on the official `fal-client` SDK and fal's queue API.

One job is one fal queue request: submit (with a per-job callback URL when
`fal_webhook_base_url` is set), then status (IN_QUEUE with its queue position, IN_PROGRESS,
COMPLETED with or without an error), result, and cancel. The request id is stored on the job
(`provider_job_id`) as soon as fal answers the submit, so a re-run resumes polling it instead of
paying for a second request. fal's callback only wakes the poller (`Keys.provider_wake`): the
status it reports is re-read from fal, never taken from the callback's body.

The model is a setting (`fal_model`): Pika v2.2 image-to-video by default; Kling, Veo, Wan and
other image-to-video models on fal take the same call with their own arguments (`arguments`).
Our parameters map onto Pika's as docs/providers.md describes: the input image as a data URI,
`prompt` (Pika requires one: the job's, else `fal_default_prompt`), the duration (5 or 10 s)
closest to num_frames / fps, `fal_resolution` and the seed. The finished video is downloaded at
once (through the SSRF guard) and handed to the one post-processing stage as a file.

The SDK retries its POSTs on 408/409/429 and connection errors and offers no switch, so unlike
Runway's create a submit whose answer was lost may be sent twice (docs/providers.md).
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import fal_client
import httpx
import redis.asyncio as aioredis
import structlog
from asyncstdlib import cached_property as async_cached_property
from fal_client.client import USER_AGENT, FalClientHTTPError

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices, estimate, fal_duration_s
from serving.db.jobs import JobRepository
from serving.errors import JobCanceled, PermanentError, ProviderTaskFailed, RetryableError
from serving.keys import Keys
from serving.netguard import UrlPolicy, fetch_public
from serving.provider_names import FAL, provider_error_code
from serving.settings import Settings
from serving.storage import ObjectStorage, make_storage
from serving.types import EncodedVideo, JobParams, Rendered, RenderJob, Stage
from serving.webhooks.inbound import CallbackTokens

log = structlog.get_logger(__name__)

PROVIDER = FAL
SDK_QUEUE_URL = "https://queue.fal.run"
MAX_POLL_ERRORS = 5
MAX_SEED = 2**31 - 1
# A callback wakes the poller through a Redis list; the wait is cut into slices this long so no
# single blocking read comes near the Redis client's socket timeout.
WAKE_SLICE_S = 1.0


class _Rebased(httpx.AsyncBaseTransport):
    """Sends the SDK's requests for queue.fal.run to `fal_queue_url` instead: the SDK reads its
    queue host from the environment once, at import, and only over HTTPS."""

    def __init__(self, base_url: str) -> None:
        self._base = httpx.URL(base_url)
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == httpx.URL(SDK_QUEUE_URL).host:
            request.url = request.url.copy_with(scheme=self._base.scheme, host=self._base.host, port=self._base.port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _QueueClient(fal_client.AsyncClient):
    """The SDK's client at another queue URL (`fal_queue_url`: a proxy, the tests' loopback fal)."""

    def __init__(self, key: str, timeout_s: float, queue_url: str) -> None:
        super().__init__(key=key, default_timeout=timeout_s)
        self._queue_url = queue_url

    @async_cached_property(asyncio.Lock)
    async def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=_Rebased(self._queue_url),
            headers={"Authorization": f"Key {self.key}", "User-Agent": USER_AGENT},
            timeout=self.default_timeout,
        )


def queue_client(settings: Settings) -> fal_client.AsyncClient:
    """The SDK's client for this server's fal key (passed in, never read from the environment);
    at fal's own queue URL the SDK's client as it is (with its backup-domain transport)."""
    key = settings.fal_api_key.get_secret_value()
    if settings.fal_queue_url.rstrip("/") == SDK_QUEUE_URL:
        return fal_client.AsyncClient(key=key, default_timeout=settings.fal_timeout_s)
    return _QueueClient(key, settings.fal_timeout_s, settings.fal_queue_url)


def arguments(model: str, settings: Settings, job: RenderJob, image: bytes, prompt: str) -> dict[str, Any]:
    """The model's input for our job (Pika's schema; Kling takes its duration as a string and
    no resolution)."""
    args: dict[str, Any] = {
        "image_url": "data:image/png;base64," + base64.b64encode(image).decode(),
        "prompt": prompt[:2000],
        "duration": fal_duration_s(job.params),
        "seed": job.params.seed % (MAX_SEED + 1),
    }
    if "kling" in model:
        args["duration"] = str(args["duration"])
    else:
        args["resolution"] = settings.fal_resolution
    return args


def failure_error_code(error_type: str | None) -> str:
    """This provider's failure code as one of ours (`serving.provider_names.provider_error_code`)."""
    return provider_error_code(PROVIDER, error_type)


class FalBackend:
    """Runs jobs on fal; also usable piecewise: `submit`, `status`, `cancel`."""

    name = PROVIDER

    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        storage: ObjectStorage | None = None,
    ) -> None:
        api_key = settings.fal_api_key.get_secret_value()
        if not api_key:
            raise ValueError("FalBackend needs SVD_SERVE_FAL_API_KEY")
        self._settings = settings
        self._model = settings.fal_model
        self._jobs = jobs
        self._redis = redis
        self._keys = keys
        self._storage = storage or make_storage(settings)  # the job's input image
        self._prices = Prices.from_settings(settings)
        self._policy = UrlPolicy.from_settings(settings)
        self._tokens = CallbackTokens(settings.url_signing_secret)
        self._client = queue_client(settings)

    async def aclose(self) -> None:
        client: httpx.AsyncClient = await self._client._client
        await client.aclose()

    # The provider interface ---------------------------------------------------------------------
    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return estimate(params, PROVIDER, self._prices, self._settings.local_job_seconds_estimate)

    async def health(self) -> bool:
        """fal has no account endpoint to probe with a model key: a configured key counts as
        healthy, and the breaker judges fal by its answers to real requests."""
        return True

    def webhook_url(self, job_id: str) -> str | None:
        base = self._settings.fal_webhook_base_url
        return self._tokens.callback_url(base, PROVIDER, job_id) if base else None

    async def submit(self, job: RenderJob) -> str:
        """Queue the request at fal; its request id."""
        prompt = (job.prompt or "").strip() or self._settings.fal_default_prompt
        if not prompt:
            raise PermanentError(f"{self._model} needs a prompt and none was given.", code="prompt_required")
        image = await asyncio.to_thread(self._storage.get, job.image_key)
        try:
            handle = await self._client.submit(
                self._model, arguments(self._model, self._settings, job, image, prompt),
                webhook_url=self.webhook_url(job.job_id),
            )
        except FalClientHTTPError as exc:
            if exc.status_code in (400, 422):
                raise PermanentError(f"fal refused the job: {str(exc)[:500]}", code="provider_rejected") from exc
            if exc.status_code in (401, 403):
                raise PermanentError("fal refused our API key.", code="provider_not_configured") from exc
            raise RetryableError(f"fal answered HTTP {exc.status_code} to the submit.", code="provider_unavailable") from exc
        except httpx.HTTPError as exc:
            raise RetryableError(f"fal could not be reached ({type(exc).__name__}).", code="provider_unavailable") from exc
        log.info("fal_request_submitted", job_id=job.job_id, request_id=handle.request_id, model=self._model)
        return str(handle.request_id)

    async def status(self, request_id: str) -> fal_client.Status:
        return await self._client.status(self._model, request_id)

    async def cancel(self, request_id: str) -> None:
        """Cancel the request at fal; one that has finished or that fal no longer knows is fine."""
        try:
            await self._client.cancel(self._model, request_id)
        except FalClientHTTPError as exc:
            if exc.status_code not in (400, 404):  # 400: ALREADY_COMPLETED
                raise
        log.info("fal_request_canceled", request_id=request_id)

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        started = time.perf_counter()
        request_id = job.provider_task_id if job.provider == PROVIDER else None
        if request_id:
            log.info("fal_request_resumed", job_id=job.job_id, request_id=request_id)
        else:
            await self._raise_if_canceled(job.job_id, None)
            request_id = await self.submit(job)
            if not await self._jobs.record_provider_task(job.job_id, provider=PROVIDER, provider_job_id=request_id):
                await self.cancel(request_id)  # the job left `processing` meanwhile (canceled)
                raise JobCanceled(f"job {job.job_id} was canceled")
        await on_stage(Stage.QUEUED, 0.0)
        await self._poll(job, request_id, on_stage)
        provider_s = time.perf_counter() - started
        began = time.perf_counter()
        video = await self._download(request_id)
        return Rendered(
            clip=EncodedVideo(video),
            gpu_seconds=0.0,
            device=PROVIDER,
            timings={"provider_s": round(provider_s, 4), "download_s": round(time.perf_counter() - began, 4)},
            cost_usd=self.estimate_cost(job.params).usd,
        )

    # Internals -------------------------------------------------------------------------------------
    async def _poll(self, job: RenderJob, request_id: str, on_stage: StageCallback) -> None:
        deadline = time.monotonic() + self._settings.fal_task_timeout_s
        errors = 0
        while True:
            await self._raise_if_canceled(job.job_id, request_id)
            status: fal_client.Status | None = None
            try:
                status = await self.status(request_id)
                errors = 0
            except FalClientHTTPError as exc:
                if exc.status_code == 404:
                    raise PermanentError(f"fal no longer knows request {request_id}.", code="provider_task_lost") from exc
                errors += 1
            except httpx.HTTPError:
                errors += 1
            if status is None:
                log.warning("fal_poll_failed", job_id=job.job_id, request_id=request_id, errors=errors)
                if errors >= MAX_POLL_ERRORS:
                    raise RetryableError("fal did not answer status reads.", code="provider_unavailable")
            elif isinstance(status, fal_client.Completed):
                if status.error:
                    raise ProviderTaskFailed(
                        f"fal request failed ({status.error_type or 'no type'}): {status.error}",
                        code=failure_error_code(status.error_type),
                    )
                return
            elif isinstance(status, fal_client.Queued):
                log.info("fal_request_queued", job_id=job.job_id, request_id=request_id, position=status.position)
                await on_stage(Stage.QUEUED, 0.0)
            else:
                await on_stage(Stage.DENOISING, 0.0)
            if time.monotonic() >= deadline:
                await self.cancel(request_id)
                raise PermanentError(
                    f"fal did not finish within {self._settings.fal_task_timeout_s:g} s.", code="provider_timeout"
                )
            await self._wait(job.job_id, self._settings.fal_poll_interval_s)

    async def _wait(self, job_id: str, seconds: float) -> None:
        """Sleep until the next poll, or until fal's callback for this job wakes us."""
        key = self._keys.provider_wake(job_id)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if await self._redis.blpop([key], timeout=max(0.01, min(left, WAKE_SLICE_S))):
                return

    async def _download(self, request_id: str) -> bytes:
        try:
            result: Any = await self._client.result(self._model, request_id)
        except FalClientHTTPError as exc:
            raise RetryableError(f"fal's result could not be read (HTTP {exc.status_code}).",
                                 code="provider_download_failed") from exc
        video = result.get("video") if isinstance(result, dict) else None
        url = video.get("url") if isinstance(video, dict) else None
        if not isinstance(url, str):
            raise PermanentError("fal reported success without a video.", code="provider_bad_output")
        return await fetch_public(
            url,
            max_bytes=self._settings.fal_output_max_bytes,
            timeout_s=self._settings.fal_timeout_s,
            policy=self._policy,
        )

    async def _raise_if_canceled(self, job_id: str, request_id: str | None) -> None:
        if await self._redis.exists(self._keys.cancel(job_id)):
            if request_id is not None:
                await self.cancel(request_id)
            raise JobCanceled(f"job {job_id} was canceled")
