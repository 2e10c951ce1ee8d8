"""The interfaces between the dispatcher and whatever makes a video (STYLE 2).

- `VideoBackend`: the one interface the runner knows: a job in, stored outputs out. In the
  Dispatcher it is `serving.providers.routed.RoutedBackend`.
- `ProviderBackend`: one place a clip can be made (the local Ray pool, Runway, fal). It returns
  frames or a video file (`Rendered`) and never stores outputs itself.
- `PostProcess`: the one post-processing stage that turns any backend's clip into the job's
  stored outputs (the PostProcessor deployment, or `PostProcessingService` in-process).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from serving.types import Clip, JobParams, PostProcessRequest, PostProcessResult, Rendered, RenderJob, RenderOutcome, Stage

if TYPE_CHECKING:
    from serving.cost import CostEstimate

StageCallback = Callable[[Stage, float], Awaitable[None]]


class VideoBackend(Protocol):
    """What the runner calls for every job."""

    name: str

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        """Produce and store the job's outputs. Raises `JobCanceled` when the job's cancel flag is
        seen, `PermanentError` when retrying cannot help, anything else for a retryable failure."""
        ...

    async def discard(self, job: RenderJob) -> None:
        """Delete whatever `render` stored for this job (its outcome lost a race with cancel)."""
        ...


@dataclass
class ProviderOutcome(RenderOutcome):
    """An outcome with what it cost where it ran (issue #6): the provider's credits and/or USD."""

    credits: float | None = None
    cost_usd: float | None = None


class ProviderBackend(Protocol):
    """One place a clip can be made (issue #6, #14): the router chooses among these. Managed
    providers (Runway, fal) also expose their task steps (`submit`, `status`, `cancel`), which
    their `generate` strings together (polling, resuming a stored task id)."""

    name: str

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        """The job's clip: frames or a finished video file, not yet post-processed."""
        ...

    async def health(self) -> bool:
        """Whether the backend can take a job now."""
        ...

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        """What a job with `params` is expected to cost on this backend."""
        ...


class PostProcess(Protocol):
    """The post-processing stage: shape, encode (or remux) and store a clip's outputs."""

    async def process(self, request: PostProcessRequest, clip: Clip) -> PostProcessResult: ...

    async def discard(self, request: PostProcessRequest) -> int: ...
