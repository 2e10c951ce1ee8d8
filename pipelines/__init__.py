"""The inference engine: batched Stable Video Diffusion sampling with per-request parameters,
progress, cancellation, OOM/NaN handling and switchable optimizations.

`VideoPipeline` and `load_pipeline` are imported lazily (PEP 562) so that the light modules
(`params`, `errors`, `batch`, `options`) stay importable without loading torch and diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.batch import BatchItem, BatchOutcome, batch_cost, batch_key, plan_batches
from pipelines.errors import (
    CallbackFailed,
    EngineConfigError,
    GenerationCanceled,
    InvalidParams,
    NonFiniteOutput,
    OutOfMemory,
    PipelineError,
)
from pipelines.options import PRESETS, EngineOptions, SizeBucket, choose_memory_mode, preset
from pipelines.params import VideoParams

if TYPE_CHECKING:
    from pipelines.svd import VideoPipeline, WarmUpReport, load_pipeline

__all__ = [
    "PRESETS",
    "BatchItem",
    "BatchOutcome",
    "CallbackFailed",
    "EngineConfigError",
    "EngineOptions",
    "GenerationCanceled",
    "InvalidParams",
    "NonFiniteOutput",
    "OutOfMemory",
    "PipelineError",
    "SizeBucket",
    "VideoParams",
    "VideoPipeline",
    "WarmUpReport",
    "batch_cost",
    "batch_key",
    "choose_memory_mode",
    "load_pipeline",
    "plan_batches",
    "preset",
]

_LAZY = {"VideoPipeline", "WarmUpReport", "load_pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from pipelines import svd

        return getattr(svd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
