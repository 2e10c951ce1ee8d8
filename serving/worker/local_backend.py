"""`VideoBackend` on our own Ray Serve deployments: Generator, then PostProcessor."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices, estimate
from serving.types import GenerationRequest, GenerationResult, JobParams, PostProcessRequest, PostProcessResult, RenderJob, RenderOutcome, Stage

T = TypeVar("T")


async def _call(response: Awaitable[T]) -> T:
    """Re-raise a replica's own exception (JobCanceled, PermanentError...) rather than Ray's wrapper."""
    try:
        return await response
    except RayTaskError as exc:
        cause: Any = exc.cause
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class LocalRayBackend:
    name = "local"

    def __init__(
        self,
        generator: DeploymentHandle,
        postprocessor: DeploymentHandle,
        *,
        app_name: str | None = None,
        prices: Prices | None = None,
        job_seconds_estimate: float = 60.0,
    ) -> None:
        self._generator = generator
        self._postprocessor = postprocessor
        # Issue #6: health (running Generator replicas of `app_name`) and cost estimates.
        self._app_name = app_name
        self._prices = prices or Prices(gpu_hour_usd=0.0, credit_usd=0.0, credits_per_second=0.0)
        self._job_seconds = job_seconds_estimate

    async def health(self) -> bool:
        """Whether the Serve app has at least one running Generator replica."""
        if self._app_name is None:
            return True
        from ray import serve
        from ray.serve.schema import ReplicaState

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self._app_name)
        generator = app.deployments.get("Generator") if app is not None else None
        return generator is not None and generator.replica_states.get(ReplicaState.RUNNING, 0) > 0

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return estimate(params, self.name, self._prices, self._job_seconds)

    @staticmethod
    def _post_request(job: RenderJob) -> PostProcessRequest:
        return PostProcessRequest.for_job(job)

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        await on_stage(Stage.DENOISING, 0.0)
        response = self._generator.generate.remote(GenerationRequest(job.job_id, job.image_key, job.params))
        try:
            generated: GenerationResult = await _call(response)
        except asyncio.CancelledError:
            # Our handler was stopped (a drain handed the job back): tell the replica too, or it
            # would keep the GPU busy with a run whose result nobody waits for.
            response.cancel()
            raise
        await on_stage(Stage.ENCODING, 0.92)
        processed: PostProcessResult = await _call(
            self._postprocessor.process.remote(self._post_request(job), generated.frames)
        )
        return RenderOutcome(
            objects=processed.objects,
            gpu_seconds=generated.gpu_seconds,
            device=generated.device,
            timings={**generated.timings, **processed.timings},
        )

    async def discard(self, job: RenderJob) -> None:
        await _call(self._postprocessor.discard.remote(self._post_request(job)))
