"""Our own Ray Serve deployments as the dispatcher sees them: the Generator pool as a
`ProviderBackend` (frames out), the PostProcessor as the `PostProcess` stage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import structlog
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices, estimate
from serving.errors import RetryableError, RunHandedBack
from serving.providers.health import PoolState, pool_state_of
from serving.provider_names import LOCAL
from serving.types import (
    Clip,
    GenerationRequest,
    GenerationResult,
    JobParams,
    PostProcessRequest,
    PostProcessResult,
    Rendered,
    RenderJob,
    Stage,
)

log = structlog.get_logger(__name__)
T = TypeVar("T")
# A run handed back by a draining node goes to another Generator after this pause (Serve keeps
# routing to the draining replica until its replacement runs), doubling up to the ceiling.
HANDBACK_PAUSE_S = 0.5
HANDBACK_PAUSE_MAX_S = 5.0


async def _call(response: Awaitable[T]) -> T:
    """Re-raise a replica's own exception (JobCanceled, PermanentError...) rather than Ray's wrapper."""
    try:
        return await response
    except RayTaskError as exc:
        cause: Any = exc.cause
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class RayPostProcess:
    """The PostProcessor deployment as the one post-processing stage of every backend."""

    def __init__(self, postprocessor: DeploymentHandle[Any]) -> None:
        self._postprocessor = postprocessor

    async def process(self, request: PostProcessRequest, clip: Clip) -> PostProcessResult:
        return await _call(self._postprocessor.process.remote(request, clip))

    async def discard(self, request: PostProcessRequest) -> int:
        return await _call(self._postprocessor.discard.remote(request))


class LocalRayBackend:
    """The Generator pool: frames out, post-processed by the stage after it."""

    name = LOCAL

    def __init__(
        self,
        generator: DeploymentHandle[Any],
        *,
        app_name: str | None = None,
        prices: Prices | None = None,
        job_seconds_estimate: float = 60.0,
        deadline_s: float = 3600.0,
    ) -> None:
        self._generator = generator
        # Issue #6: health (running Generator replicas of `app_name`) and cost estimates.
        self._app_name = app_name
        self._prices = prices or Prices(gpu_hour_usd=0.0, credit_usd=0.0, credits_per_second=0.0)
        self._job_seconds = job_seconds_estimate
        self._deadline_s = deadline_s

    async def pool_state(self) -> PoolState:
        """The Generator pool as Serve's controller sees it (one `serve.status()` call)."""
        if self._app_name is None:
            return PoolState.READY
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self._app_name)
        generator = app.deployments.get("Generator") if app is not None else None
        if generator is None:
            return PoolState.DOWN
        return pool_state_of(str(generator.status), {str(k): v for k, v in generator.replica_states.items()})

    async def health(self) -> bool:
        """Whether a job sent here now will run: replicas running, or none wanted (scaled to zero:
        the job itself brings one up)."""
        return (await self.pool_state()) in (PoolState.READY, PoolState.IDLE)

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return estimate(params, self.name, self._prices, self._job_seconds)

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        await on_stage(Stage.DENOISING, 0.0)
        generated = await self._generate(job, on_stage)
        return Rendered(
            clip=generated.frames, gpu_seconds=generated.gpu_seconds, device=generated.device,
            timings=dict(generated.timings),
        )

    async def _generate(self, job: RenderJob, on_stage: StageCallback) -> GenerationResult:
        """One generation; a run handed back by a draining node runs again on another replica,
        as part of the same attempt, until the job's deadline."""
        give_up = time.monotonic() + self._deadline_s
        pause = HANDBACK_PAUSE_S
        while True:
            response = self._generator.generate.remote(GenerationRequest(job.job_id, job.image_key, job.params))
            try:
                return await _call(response)
            except asyncio.CancelledError:
                # Our handler was stopped (a drain handed the job back): tell the replica too, or
                # it would keep the GPU busy with a run whose result nobody waits for.
                response.cancel()  # type: ignore[no-untyped-call]  # unannotated in Ray
                raise
            except RunHandedBack as exc:
                if time.monotonic() + pause > give_up:
                    raise RetryableError(f"No Generator could keep the job until its deadline: {exc}") from exc
                log.info("generation_rescheduled", job_id=job.job_id, reason=exc.message)
                await on_stage(Stage.QUEUED, 0.0)
                await asyncio.sleep(pause)  # back-off while Serve moves replicas off the node
                pause = min(2 * pause, HANDBACK_PAUSE_MAX_S)
                await on_stage(Stage.DENOISING, 0.0)

