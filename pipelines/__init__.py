"""The inference engine: Stable Video Diffusion sampling with progress, cancellation and NaN checks.

`VideoPipeline` and `load_pipeline` are imported lazily (PEP 562) so that `pipelines.params` and
`pipelines.errors` stay importable without loading torch and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.errors import GenerationCanceled, InvalidParams, NonFiniteOutput, PipelineError
from pipelines.params import VideoParams

if TYPE_CHECKING:
    from pipelines.svd import VideoPipeline, load_pipeline

__all__ = [
    "GenerationCanceled",
    "InvalidParams",
    "NonFiniteOutput",
    "PipelineError",
    "VideoParams",
    "VideoPipeline",
    "load_pipeline",
]

_LAZY = {"VideoPipeline", "load_pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from pipelines import svd

        return getattr(svd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
