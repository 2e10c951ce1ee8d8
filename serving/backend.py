"""The one interface the dispatcher knows (STYLE 2): something that turns a job into outputs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from serving.types import JobParams, RenderJob, RenderOutcome, Stage

if TYPE_CHECKING:
    from serving.cost import CostEstimate

StageCallback = Callable[[Stage, float], Awaitable[None]]


class VideoBackend(Protocol):
    """Implemented by the local Ray generator (and, later, by the Runway adapter)."""

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
    """A managed provider's outcome: what it charged, in its credits (issue #6)."""

    credits: float | None = None


class ProviderBackend(VideoBackend, Protocol):
    """A `VideoBackend` the router can choose (issue #6): besides `render`/`discard`, it says
    whether it can take work and what a job would cost there. Managed providers (Runway) also
    expose their task steps: `submit(job, prompt) -> task id`, `status(task id)`, `cancel(task id)`,
    which their `render` strings together (polling, resuming a stored task id)."""

    async def health(self) -> bool:
        """Whether the backend can take a job now."""
        ...

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        """What a job with `params` is expected to cost on this backend."""
        ...
