"""What a batch of requests is: its items, its outcomes, and which requests may share one.

Light on purpose (no torch): the serving layer forms batches with `batch_key`, `batch_cost` and
`plan_batches` before any GPU work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.errors import PipelineError
from pipelines.params import VideoParams

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]
BatchKey = tuple[int, int, int, int]


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch with its own callbacks.

    `on_progress(step_done, total_steps)` runs after every denoising step; `should_cancel()` runs
    before the first step and after every step, and a true answer drops this item from the batch.
    """

    params: VideoParams
    on_progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None


@dataclass(frozen=True)
class BatchOutcome:
    """The result of one `BatchItem`: uint8 frames (num_frames, height, width, 3) or an error."""

    frames: np.ndarray | None
    error: PipelineError | None

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.error is None):
            raise ValueError("A BatchOutcome holds either frames or an error, never both or neither.")

    @property
    def ok(self) -> bool:
        return self.error is None


def batch_key(params: VideoParams) -> BatchKey:
    """Requests of one model share a denoising loop only when this key is equal.

    The key is per model: callers batching across models prefix it with the model name.
    Everything else (image, seed, fps, motion, noise augmentation, guidance, decode chunk) may differ.
    """
    return (params.width, params.height, params.num_frames, params.num_inference_steps)


def batch_cost(params: VideoParams) -> int:
    """The work and activation memory of one request, in frames x pixels."""
    return params.num_frames * params.width * params.height


def plan_batches(params: Sequence[VideoParams], max_cost: int, max_size: int) -> list[list[int]]:
    """Group request indices into batches of equal `batch_key`, each within `max_cost` and `max_size`.

    Arrival order is kept inside a batch and batches start in the order of their first request, so
    an early request is never pushed behind later ones. A request costing more than `max_cost` on its
    own still runs, alone.
    """
    if max_cost < 1 or max_size < 1:
        raise ValueError(f"`max_cost` and `max_size` must be at least 1, got {max_cost} and {max_size}.")
    batches: list[list[int]] = []
    open_batch: dict[BatchKey, tuple[list[int], int]] = {}
    for index, item in enumerate(params):
        key, cost = batch_key(item), batch_cost(item)
        current = open_batch.get(key)
        if current is not None and len(current[0]) < max_size and current[1] + cost <= max_cost:
            current[0].append(index)
            open_batch[key] = (current[0], current[1] + cost)
            continue
        batch = [index]
        batches.append(batch)
        open_batch[key] = (batch, cost)
    return batches
