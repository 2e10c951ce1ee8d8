"""Image-to-video generation on a loaded Stable Video Diffusion pipeline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableVideoDiffusionPipeline
from PIL import Image, ImageOps

from models.loading import LoadOptions, load_svd_pipeline
from models.specs import SIZE_MULTIPLE, ModelSpec
from pipelines.errors import GenerationCanceled, InvalidParams, NonFiniteOutput
from pipelines.params import VideoParams

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts an unsigned 64-bit seed


class VideoPipeline:
    """One loaded model, generating one video per `generate` call (uint8 frames, THWC).

    Not thread-safe: the scheduler keeps per-call state, so callers run one `generate` at a time.
    """

    def __init__(self, pipe: StableVideoDiffusionPipeline, spec: ModelSpec) -> None:
        self._pipe = pipe
        self.spec = spec

    @property
    def device(self) -> str:
        return str(self._pipe.device)

    @property
    def diffusers_pipeline(self) -> StableVideoDiffusionPipeline:
        """The wrapped diffusers pipeline (for benchmarks and tests)."""
        return self._pipe

    def check_params(self, params: VideoParams) -> None:
        """Raise `InvalidParams` unless the model accepts `params`; runs nothing on the device."""
        spec = self.spec
        for name, value in (("width", params.width), ("height", params.height)):
            if not spec.min_size <= value <= spec.max_size or value % SIZE_MULTIPLE:
                raise InvalidParams(
                    f"`{name}` must be a multiple of {SIZE_MULTIPLE} between {spec.min_size} and "
                    f"{spec.max_size} for model {spec.name!r}, but is {value}."
                )
        _check_range(spec, "num_frames", params.num_frames, spec.min_num_frames, spec.max_num_frames)
        _check_range(spec, "num_inference_steps", params.num_inference_steps, spec.min_steps, spec.max_steps)
        if params.fps < 1:
            raise InvalidParams(f"`fps` must be at least 1, but is {params.fps}.")
        if params.motion_bucket_id < 0:
            raise InvalidParams(f"`motion_bucket_id` must be non-negative, but is {params.motion_bucket_id}.")
        if params.noise_aug_strength < 0:
            raise InvalidParams(
                f"`noise_aug_strength` must be non-negative, but is {params.noise_aug_strength}."
            )
        if not 0 <= params.seed <= _MAX_SEED:
            raise InvalidParams(f"`seed` must be between 0 and {_MAX_SEED}, but is {params.seed}.")
        if params.decode_chunk_size is not None and params.decode_chunk_size < 1:
            raise InvalidParams(f"`decode_chunk_size` must be at least 1, but is {params.decode_chunk_size}.")

    def generate(
        self,
        params: VideoParams,
        on_progress: ProgressFn | None = None,
        should_cancel: CancelFn | None = None,
    ) -> np.ndarray:
        """Generate a video: a uint8 array of shape (num_frames, height, width, 3).

        `on_progress(step_done, total_steps)` runs after every denoising step; `should_cancel()` runs
        before the first step and after every step, and a true answer raises `GenerationCanceled`.
        Raises `NonFiniteOutput` instead of returning a video holding NaN/inf.
        """
        # 1. Check inputs before touching the device.
        self.check_params(params)
        callback = _StepCallback(params.num_inference_steps, on_progress, should_cancel)
        callback.check_cancel()

        # 2. Fit the conditioning image to the output size (cover, then center-crop).
        image = _fit_image(params.image, params.width, params.height)

        # 3. One generator for both the image noise and the initial latents: same seed, same video.
        generator = torch.Generator(device=self._pipe.device).manual_seed(params.seed)

        # 4. Encode, denoise and decode with diffusers' sampler.
        try:
            with torch.inference_mode():
                frames = self._pipe(
                    image=image,
                    height=params.height,
                    width=params.width,
                    num_frames=params.num_frames,
                    num_inference_steps=params.num_inference_steps,
                    min_guidance_scale=params.min_guidance_scale,
                    max_guidance_scale=params.max_guidance_scale,
                    fps=params.fps,
                    motion_bucket_id=params.motion_bucket_id,
                    noise_aug_strength=params.noise_aug_strength,
                    decode_chunk_size=params.decode_chunk_size or self.spec.default_decode_chunk_size,
                    generator=generator,
                    output_type="pt",
                    callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).frames[0]
        except BaseException:
            # A canceled (or failed) run leaves activations in the CUDA cache; hand them back now.
            self._free_memory()
            raise

        # 5. Refuse NaN/inf rather than quietly encoding a black video.
        if not bool(torch.isfinite(frames).all()):
            raise NonFiniteOutput(
                f"Model {self.spec.name!r} produced non-finite values (NaN or inf) for seed {params.seed}; "
                "this usually means a float16 overflow: retry with another seed or in float32/bfloat16."
            )

        # 6. (frames, 3, H, W) floats in [0, 1] -> (frames, H, W, 3) uint8.
        video = (frames * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        result: np.ndarray = video.cpu().numpy()
        return result

    def _free_memory(self) -> None:
        if self._pipe.device.type == "cuda":
            torch.cuda.empty_cache()


class _StepCallback:
    """diffusers' `callback_on_step_end`: reports progress and raises on cancellation."""

    def __init__(
        self, total_steps: int, on_progress: ProgressFn | None, should_cancel: CancelFn | None
    ) -> None:
        self.total_steps = total_steps
        self.steps_done = 0
        self._on_progress = on_progress
        self._should_cancel = should_cancel

    def check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise GenerationCanceled(self.steps_done, self.total_steps)

    def __call__(
        self,
        pipe: DiffusionPipeline,
        step: int,
        timestep: torch.Tensor | int,
        callback_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        self.steps_done = step + 1
        # The scheduler may settle on a different count than requested; it knows the real total.
        self.total_steps = getattr(pipe, "num_timesteps", self.total_steps)
        if self._on_progress is not None:
            self._on_progress(self.steps_done, self.total_steps)
        self.check_cancel()
        return callback_kwargs


def _check_range(spec: ModelSpec, name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidParams(
            f"`{name}` must be between {low} and {high} for model {spec.name!r}, but is {value}."
        )


def _fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    # Scale to cover the target then center-crop, so the aspect ratio is never distorted.
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def load_pipeline(spec: ModelSpec, options: LoadOptions) -> VideoPipeline:
    """Load `spec`'s weights (see `models.loading.load_svd_pipeline`) and wrap them for generation."""
    return VideoPipeline(load_svd_pipeline(spec, options), spec)
