"""Errors raised by the inference engine."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error raised by the `pipelines` package."""


class InvalidParams(PipelineError, ValueError):
    """The generation parameters are outside what the model accepts; nothing ran."""


class GenerationCanceled(PipelineError):
    """`should_cancel()` answered true; the generation stopped and its memory was released."""

    def __init__(self, steps_done: int, total_steps: int) -> None:
        self.steps_done = steps_done
        self.total_steps = total_steps
        super().__init__(f"Generation canceled after {steps_done} of {total_steps} denoising steps.")


class NonFiniteOutput(PipelineError):
    """The decoded video holds NaN or infinite values (typically an fp16 overflow)."""
