"""The one interface the dispatcher knows (STYLE 2): something that turns a job into outputs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from serving.types import RenderJob, RenderOutcome, Stage

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
