"""`VideoBackend` on our own Ray Serve deployments: Generator, then PostProcessor."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle

from serving.backend import StageCallback
from serving.types import GenerationRequest, GenerationResult, PostProcessRequest, PostProcessResult, RenderJob, RenderOutcome, Stage

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

    def __init__(self, generator: DeploymentHandle, postprocessor: DeploymentHandle) -> None:
        self._generator = generator
        self._postprocessor = postprocessor

    @staticmethod
    def _post_request(job: RenderJob) -> PostProcessRequest:
        return PostProcessRequest.for_job(job)

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        await on_stage(Stage.DENOISING, 0.0)
        generated: GenerationResult = await _call(
            self._generator.generate.remote(GenerationRequest(job.job_id, job.image_key, job.params))
        )
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
