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


class OutOfMemory(PipelineError):
    """The device ran out of memory even after the engine stepped down (smaller decode chunk,
    smaller batch) and retried once. Retryable: the next request on the replica runs normally."""


class CallbackFailed(PipelineError):
    """A request's own progress or cancel callback raised; only that request stopped.

    The original exception is the `__cause__`.
    """


class EngineConfigError(PipelineError, ValueError):
    """The engine options cannot be applied (an unknown preset, an impossible combination)."""
