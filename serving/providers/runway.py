"""Runway as a `VideoBackend`, on the official `runwayml` SDK (image_to_video, tasks).

One job is one Runway task. The task id is stored on the job (`provider_job_id`) as soon as
Runway answers the create, before any poll: a re-run of the job (worker lost, lease lapsed) finds
it and resumes polling instead of paying for a second task. The create itself is sent once
(SDK `max_retries=0`); a failed create is retried by our queue, never by the SDK, because a
retried POST whose first answer was lost could create a second paid task. Polls and deletes
keep the SDK's retries (they are idempotent). Tasks are polled no faster than
`runway_poll_interval_s` (Runway's guidance: 5 s), backing off while PENDING or THROTTLED.

Runway's output URLs expire within a day or two, so the video is downloaded at once (through
the SSRF guard; an expired URL is refreshed by reading the task again) and handed back as a
file: the one post-processing stage after every backend (the PostProcessor deployment) remuxes
or re-encodes it and stores the outputs.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import runwayml
import structlog

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices, estimate, runway_duration_s
from serving.db.jobs import JobRepository
from serving.errors import FetchFailed, JobCanceled, PermanentError, ProviderTaskFailed, RetryableError, UnsafeUrl
from serving.keys import Keys
from serving.netguard import UrlPolicy, fetch_public
from serving.provider_names import RUNWAY, provider_error_code
from serving.settings import Settings
from serving.storage import ObjectStorage, make_storage
from serving.types import EncodedVideo, JobParams, Rendered, RenderJob, Stage

log = structlog.get_logger(__name__)

PROVIDER = RUNWAY
# Output ratios Runway accepts per model; a job gets the one closest to its aspect ratio.
RATIOS: dict[str, tuple[str, ...]] = {
    "gen4_turbo": ("1280:720", "720:1280", "1104:832", "832:1104", "960:960", "1584:672"),
    "gen3a_turbo": ("1280:768", "768:1280"),
}
MAX_SEED = 4294967295
# Consecutive failed polls tolerated before the attempt gives up (the task id stays stored).
MAX_POLL_ERRORS = 5
MAX_OUTPUT_REFRESHES = 3
# Runway status -> our stage while the job is processing: PENDING/THROTTLED wait in Runway's
# own queue (stage "queued"), RUNNING generates (stage "denoising", with Runway's progress).
_WAITING = {"PENDING", "THROTTLED"}


@dataclass(frozen=True)
class TaskStatus:
    """One read of a Runway task, in our terms."""

    task_id: str
    status: str  # Runway's: PENDING|THROTTLED|RUNNING|SUCCEEDED|FAILED|CANCELLED
    progress: float = 0.0
    outputs: tuple[str, ...] = ()
    credits: float | None = None
    failure: str | None = None
    failure_code: str | None = None

    @property
    def stage(self) -> Stage:
        return Stage.QUEUED if self.status in _WAITING else Stage.DENOISING


def pick_ratio(model: str, width: int, height: int) -> str:
    """The ratio of `model` whose aspect is closest to width:height."""
    ratios = RATIOS.get(model)
    if not ratios:
        raise PermanentError(f"Runway model {model!r} is not supported.", code="provider_not_configured")
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = (int(part) for part in ratio.split(":"))
        return abs(math.log(w / h) - target)

    return min(ratios, key=distance)


def failure_error_code(failure_code: str | None) -> str:
    """This provider's failure code as one of ours (`serving.provider_names.provider_error_code`)."""
    return provider_error_code(PROVIDER, failure_code)


class RunwayBackend:
    """Runs jobs on Runway; also usable piecewise: `submit`, `status`, `cancel`, `health`."""

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
        api_key = settings.runway_api_key.get_secret_value()
        if not api_key:
            raise ValueError("RunwayBackend needs SVD_SERVE_RUNWAY_API_KEY")
        self._settings = settings
        self._jobs = jobs
        self._redis = redis
        self._keys = keys
        self._storage = storage or make_storage(settings)  # the job's input image
        self._prices = Prices.from_settings(settings)
        self._policy = UrlPolicy.from_settings(settings)
        # Explicit base_url and key: the SDK would otherwise read RUNWAYML_* from the environment.
        self._client = runwayml.AsyncRunwayML(
            api_key=api_key, base_url=settings.runway_base_url, timeout=settings.runway_timeout_s, max_retries=2
        )
        self._create_client = self._client.with_options(max_retries=0)

    async def aclose(self) -> None:
        await self._client.close()

    # The provider interface ---------------------------------------------------------------------
    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return estimate(params, PROVIDER, self._prices, self._settings.local_job_seconds_estimate)

    async def health(self) -> bool:
        """Whether Runway answers for our account (GET /v1/organization)."""
        try:
            await self._client.organization.retrieve()
        except runwayml.APIError as exc:
            log.warning("runway_unhealthy", error=type(exc).__name__)
            return False
        return True

    async def submit(self, job: RenderJob, prompt: str | None) -> str:
        """Create the Runway task; its id. Sent exactly once (no SDK retry)."""
        model = self._settings.runway_model
        image = await asyncio.to_thread(self._storage.get, job.image_key)
        request: dict[str, Any] = {
            "model": model,
            "prompt_image": "data:image/png;base64," + base64.b64encode(image).decode(),
            "ratio": pick_ratio(model, job.params.width, job.params.height),
            "duration": runway_duration_s(job.params),
            "seed": job.params.seed % (MAX_SEED + 1),
        }
        if prompt:
            request["prompt_text"] = prompt[:1000]
        try:
            created = await self._create_client.image_to_video.create(**request)
        except runwayml.RateLimitError as exc:
            raise RetryableError("Runway is rate limiting task creation.", code="provider_rate_limited") from exc
        except (runwayml.InternalServerError, runwayml.APIConnectionError) as exc:
            raise RetryableError(
                f"Runway could not create the task ({type(exc).__name__}).", code="provider_unavailable"
            ) from exc
        except runwayml.BadRequestError as exc:
            raise PermanentError(f"Runway refused the job: {_error_text(exc)}", code="provider_rejected") from exc
        except runwayml.APIStatusError as exc:
            raise RetryableError(
                f"Runway answered HTTP {exc.status_code} to the create.", code="provider_unavailable"
            ) from exc
        log.info("runway_task_created", job_id=job.job_id, task_id=created.id)
        return str(created.id)

    async def status(self, task_id: str) -> TaskStatus:
        task: Any = await self._client.tasks.retrieve(task_id)
        status = str(task.status)
        cost = getattr(task, "cost", None) or getattr(task, "estimated_cost", None)
        return TaskStatus(
            task_id=task_id,
            status=status,
            progress=float(getattr(task, "progress", 0.0) or 0.0),
            outputs=tuple(getattr(task, "output", None) or ()),
            credits=float(cost.credits) if cost is not None else None,
            failure=getattr(task, "failure", None),
            failure_code=getattr(task, "failure_code", None),
        )

    async def cancel(self, task_id: str) -> None:
        """Cancel (or delete) the task at Runway; a task Runway no longer knows is fine."""
        try:
            await self._client.tasks.delete(task_id)
        except runwayml.NotFoundError:
            pass
        log.info("runway_task_deleted", task_id=task_id)

    # VideoBackend ---------------------------------------------------------------------------------
    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        started = time.perf_counter()
        task_id = job.provider_task_id if job.provider == PROVIDER else None
        if task_id:
            log.info("runway_task_resumed", job_id=job.job_id, task_id=task_id)
        else:
            await self._raise_if_canceled(job.job_id, None)
            task_id = await self.submit(job, job.prompt)
            if not await self._jobs.record_provider_task(job.job_id, provider=PROVIDER, provider_job_id=task_id):
                await self.cancel(task_id)  # the job left `processing` meanwhile (canceled)
                raise JobCanceled(f"job {job.job_id} was canceled")
        await on_stage(Stage.QUEUED, 0.0)
        finished = await self._poll(job, task_id, on_stage)
        provider_s = time.perf_counter() - started
        began = time.perf_counter()
        video = await self._download(task_id, finished)
        download_s = time.perf_counter() - began
        return Rendered(
            clip=EncodedVideo(video),
            gpu_seconds=0.0,
            device=PROVIDER,
            timings={"provider_s": round(provider_s, 4), "download_s": round(download_s, 4)},
            credits=finished.credits,
        )

    # Internals -------------------------------------------------------------------------------------
    async def _poll(self, job: RenderJob, task_id: str, on_stage: StageCallback) -> TaskStatus:
        base = self._settings.runway_poll_interval_s
        interval = base
        deadline = time.monotonic() + self._settings.runway_task_timeout_s
        errors = 0
        while True:
            await self._raise_if_canceled(job.job_id, task_id)
            try:
                task = await self.status(task_id)
                errors = 0
            except runwayml.NotFoundError as exc:
                raise PermanentError(f"Runway no longer knows task {task_id}.", code="provider_task_lost") from exc
            except runwayml.APIError as exc:
                errors += 1
                log.warning("runway_poll_failed", job_id=job.job_id, task_id=task_id, error=type(exc).__name__)
                if errors >= MAX_POLL_ERRORS:
                    raise RetryableError("Runway did not answer task reads.", code="provider_unavailable") from exc
                task = None
            if task is not None:
                if task.status == "SUCCEEDED":
                    return task
                if task.status == "FAILED":
                    raise ProviderTaskFailed(
                        f"Runway task failed ({task.failure_code or 'no code'}): {task.failure or 'no reason given'}",
                        code=failure_error_code(task.failure_code),
                        credits=task.credits,
                    )
                if task.status == "CANCELLED":
                    raise PermanentError(f"Runway task {task_id} was canceled at Runway.", code="provider_canceled")
                await on_stage(task.stage, 0.9 * task.progress if task.status == "RUNNING" else 0.0)
                # Waiting in Runway's queue: back off; running: keep to the base interval.
                ceiling = self._settings.runway_poll_max_interval_s
                interval = min(interval * 1.5, ceiling) if task.status in _WAITING else base
            if time.monotonic() >= deadline:
                await self.cancel(task_id)
                raise PermanentError(
                    f"Runway did not finish within {self._settings.runway_task_timeout_s:g} s.", code="provider_timeout"
                )
            await asyncio.sleep(interval)

    async def _download(self, task_id: str, task: TaskStatus) -> bytes:
        for _ in range(MAX_OUTPUT_REFRESHES):
            if not task.outputs:
                raise PermanentError("Runway reported success without an output.", code="provider_bad_output")
            try:
                return await fetch_public(
                    task.outputs[0],
                    max_bytes=self._settings.runway_output_max_bytes,
                    timeout_s=self._settings.runway_timeout_s,
                    policy=self._policy,
                )
            except UnsafeUrl:
                raise
            except FetchFailed as exc:
                # Most likely an expired URL: reading the task again hands out fresh ones.
                log.info("runway_output_refresh", task_id=task_id, error=exc.message)
                task = await self.status(task_id)
        raise RetryableError("Runway's output could not be downloaded.", code="provider_download_failed")

    async def _raise_if_canceled(self, job_id: str, task_id: str | None) -> None:
        if await self._redis.exists(self._keys.cancel(job_id)):
            if task_id is not None:
                await self.cancel(task_id)
            raise JobCanceled(f"job {job_id} was canceled")


def _error_text(exc: runwayml.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:500]
    return f"HTTP {exc.status_code}"
