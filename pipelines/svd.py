"""Image-to-video generation on a loaded Stable Video Diffusion pipeline: one request or a batch."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image, ImageOps

from models.loading import LoadOptions, load_svd_pipeline
from models.specs import SIZE_MULTIPLE, ModelSpec
from pipelines.batch import BatchItem, BatchOutcome, CancelFn, ProgressFn, batch_key
from pipelines.errors import CallbackFailed, GenerationCanceled, InvalidParams, OutOfMemory, PipelineError
from pipelines.faults import release_memory
from pipelines.optimize import EngineRuntime, compiled_graph_count, prepare_runtime, set_forward_chunking
from pipelines.options import EngineOptions, SizeBucket
from pipelines.params import VideoParams
from pipelines.sampler import DenoiseOutOfMemory, SampleRequest, SampleResult, StageTimings, SVDSampler

log = logging.getLogger(__name__)

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts an unsigned 64-bit seed


@dataclass(frozen=True)
class WarmUpReport:
    """What `VideoPipeline.warm_up` did: its wall time and the graphs it compiled."""

    seconds: float
    graphs_compiled: int
    buckets: tuple[SizeBucket, ...]


class VideoPipeline:
    """One loaded model, generating videos (uint8 frames, THWC) one request or one batch at a time.

    Not thread-safe: callers run one `generate`/`generate_batch` at a time (one GPU, one loop).
    """

    def __init__(
        self, pipe: StableVideoDiffusionPipeline, spec: ModelSpec, options: EngineOptions | None = None
    ) -> None:
        self._pipe = pipe
        self.spec = spec
        self.options = options or EngineOptions()
        self._runtime: EngineRuntime = prepare_runtime(pipe, self.options)
        self._sampler = SVDSampler(pipe, self._runtime, self.options)
        self._warmed_graphs: int | None = None
        for note in self._runtime.notes:
            log.info("engine %s: %s", self.options.name, note)

    @property
    def device(self) -> str:
        return str(self._pipe._execution_device)

    @property
    def diffusers_pipeline(self) -> StableVideoDiffusionPipeline:
        """The wrapped diffusers pipeline (for benchmarks and tests)."""
        return self._pipe

    @property
    def memory_mode(self) -> str:
        return self._runtime.memory_mode

    @property
    def engine_notes(self) -> list[str]:
        """Which optimizations are live, and why any requested one is not."""
        return list(self._runtime.notes)

    @property
    def last_timings(self) -> StageTimings:
        """Stage timings of the last batch (encode, denoise, decode; UNet rows processed)."""
        return self._sampler.timings

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
        if params.min_guidance_scale < 0 or params.min_guidance_scale > params.max_guidance_scale:
            raise InvalidParams(
                f"`min_guidance_scale` must be between 0 and `max_guidance_scale` ({params.max_guidance_scale}), "
                f"but is {params.min_guidance_scale}."
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
        Raises `InvalidParams`, `NonFiniteOutput`, `OutOfMemory`, or whatever a callback raised.
        """
        self.check_params(params)
        outcome = self.generate_batch([BatchItem(params, on_progress, should_cancel)])[0]
        if outcome.error is not None:
            if isinstance(outcome.error, CallbackFailed) and outcome.error.__cause__ is not None:
                raise outcome.error.__cause__  # alone, a failing callback is the caller's own error
            raise outcome.error
        assert outcome.frames is not None
        return outcome.frames

    def generate_batch(self, items: Sequence[BatchItem]) -> list[BatchOutcome]:
        """Generate a batch in one denoising loop; one outcome per item, in order.

        Items must share `batch_key` (size, frame count, steps), else `InvalidParams` is raised and
        nothing runs. Per item: invalid parameters, cancellation (the item leaves the batch at the
        next step), a failing callback, non-finite output or running out of memory end that item
        only. Out of memory steps down once: half the VAE decode chunk for the decode, a split batch
        (or, alone, chunked feed-forward) for the denoising, which then starts over (progress is
        reported from step 1 again); a second failure is `OutOfMemory`. Non-finite frames are
        decoded again in float32; still non-finite, `NonFiniteOutput`. Any other exception is a bug
        and propagates.
        """
        return [_to_outcome(result) for result in self.run_batch(items)]

    def run_batch(self, items: Sequence[BatchItem], *, decode: bool = True) -> list[SampleResult]:
        """`generate_batch` returning tensors: final latents and [0, 1] frames on the device.

        For benchmarks and tests that compare numerics; `decode=False` stops after the denoising loop.
        """
        keys = {batch_key(item.params) for item in items}
        if len(keys) > 1:
            raise InvalidParams(
                "A batch must share width, height, num_frames and num_inference_steps; got "
                + ", ".join(str(key) for key in sorted(keys))
                + "."
            )
        results = [SampleResult() for _ in items]
        requests: list[tuple[int, SampleRequest]] = []
        for index, item in enumerate(items):
            try:
                self.check_params(item.params)
            except InvalidParams as exc:
                results[index].error = exc
                continue
            requests.append((index, self._request(item)))
        if not requests:
            return results

        graphs_before = compiled_graph_count() if self._runtime.compiled else 0
        for (index, _), result in zip(requests, self._sample_with_oom_ladder([r for _, r in requests], decode), strict=False):
            results[index] = result
        if any(isinstance(result.error, GenerationCanceled) for result in results):
            # A canceled request's activations sit in the allocator's cache; hand them back now.
            release_memory(self._runtime.device)
        if self._runtime.compiled and self._warmed_graphs is not None:
            compiled = compiled_graph_count() - graphs_before
            if compiled:
                log.warning("engine %s: a request compiled %d new graph(s); add its size to the warm-up buckets",
                            self.options.name, compiled)
        return results

    def denoise_once(
        self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, time_ids: torch.Tensor
    ) -> torch.Tensor:
        """One full UNet call as configured (precision, compile, FP8), for fidelity measurements.

        Inputs are cast to the UNet's dtype; `sample` is (rows, frames, 8, h, w) with the image latents.
        """
        dtype = self._pipe.unet.dtype
        with torch.inference_mode():
            out, _ = self._runtime.denoiser(
                sample.to(dtype), timestep, context.to(dtype), time_ids.to(dtype), None
            )
        return out

    def warm_up(self, buckets: Sequence[SizeBucket], max_batch_size: int = 1) -> WarmUpReport:
        """Run every configured size bucket through the engine once per batch size, so compiled
        graphs (and cuDNN's algorithm choices) exist before the first request: no request recompiles.

        Each bucket runs the denoiser at every UNet batch size a batch of up to `max_batch_size`
        requests can produce (1 .. 2 x max_batch_size, both DeepCache paths) and, with a compiled VAE
        decoder, decodes the bucket's fixed chunk (`decode_chunk`) and the last, shorter one.
        """
        started = time.perf_counter()
        graphs_before = compiled_graph_count()
        with torch.inference_mode():
            for bucket in buckets:
                self._warm_bucket(bucket, max_batch_size)
        if self._runtime.device.type == "cuda":
            torch.cuda.synchronize(self._runtime.device)
        self._warmed_graphs = compiled_graph_count()
        return WarmUpReport(
            seconds=time.perf_counter() - started,
            graphs_compiled=self._warmed_graphs - graphs_before,
            buckets=tuple(buckets),
        )

    def _warm_bucket(self, bucket: SizeBucket, max_batch_size: int) -> None:
        pipe, device = self._pipe, self._pipe._execution_device
        unet = pipe.unet
        dtype = unet.dtype
        latent = (bucket.num_frames, unet.config.in_channels, bucket.height // pipe.vae_scale_factor,
                  bucket.width // pipe.vae_scale_factor)
        context_dim = unet.config.cross_attention_dim
        timestep = torch.tensor(1.0, device=device)
        for rows in range(1, 2 * max_batch_size + 1):
            sample = torch.zeros(rows, *latent, dtype=dtype, device=device)
            context = torch.zeros(rows, 1, context_dim, dtype=dtype, device=device)
            time_ids = torch.zeros(rows, 3, dtype=dtype, device=device)
            _, deep = self._runtime.denoiser(sample, timestep, context, time_ids, None)
            if deep is not None:
                self._runtime.denoiser(sample, timestep, context, time_ids, deep)
        if self._runtime.compiled_decoder:
            chunk = self.decode_chunk(bucket.num_frames, None)
            for frames in sorted({chunk, bucket.num_frames % chunk} - {0}):
                latents = torch.zeros(frames, latent[1] // 2, *latent[2:], dtype=pipe.vae.dtype, device=device)
                self._runtime.decode(latents, frames)

    def decode_chunk(self, num_frames: int, requested: int | None) -> int:
        """How many frames the VAE decodes at a time for a request.

        The request's `decode_chunk_size` (else the model's default), except under a compiled VAE
        decoder: its graphs are per chunk length, so every request of a size bucket decodes in the
        bucket's fixed chunks (the model's default, at most the frame count), the ones warmed up,
        and no request recompiles the decoder.
        """
        default = self.spec.default_decode_chunk_size
        if self._runtime.compiled_decoder:
            return min(default, num_frames)
        return requested or default

    def _request(self, item: BatchItem) -> SampleRequest:
        params = item.params
        return SampleRequest(
            params=params,
            image=fit_image(params.image, params.width, params.height),
            decode_chunk=self.decode_chunk(params.num_frames, params.decode_chunk_size),
            on_progress=item.on_progress,
            should_cancel=item.should_cancel,
        )

    def _sample_with_oom_ladder(self, requests: list[SampleRequest], decode: bool) -> list[SampleResult]:
        try:
            return self._sampler.sample(requests, decode=decode)
        except DenoiseOutOfMemory as exc:
            if not self.options.oom_retry:
                return [SampleResult(error=OutOfMemory(f"Out of device memory while denoising: {exc}"))
                        for _ in requests]
            first_failure = str(exc)
        if len(requests) > 1:
            # Step down: two half batches, each tried once.
            half = (len(requests) + 1) // 2
            log.warning("engine %s: out of memory with a batch of %d, splitting", self.options.name, len(requests))
            return self._sample_once(requests[:half], decode) + self._sample_once(requests[half:], decode)
        log.warning("engine %s: out of memory on a single request, retrying with chunked feed-forward",
                    self.options.name)
        set_forward_chunking(self._pipe.unet, enabled=True)
        try:
            # Eager: a compiled graph would recompile for the chunking (minutes, under memory
            # pressure) and specialize the batch dimension it marks dynamic.
            return self._sample_once(requests, decode, first_failure, eager=True)
        finally:
            if self._runtime.memory_mode != "low_vram":
                set_forward_chunking(self._pipe.unet, enabled=False)

    def _sample_once(
        self, requests: list[SampleRequest], decode: bool, first_failure: str = "", eager: bool = False
    ) -> list[SampleResult]:
        try:
            return self._sampler.sample(requests, decode=decode, eager=eager)
        except DenoiseOutOfMemory as exc:
            detail = f"{first_failure}; then {exc}" if first_failure else str(exc)
        release_memory(self._pipe._execution_device)
        return [
            SampleResult(error=OutOfMemory(f"Out of device memory while denoising, after stepping down: {detail}"))
            for _ in requests
        ]


def _to_outcome(result: SampleResult) -> BatchOutcome:
    if result.error is not None:
        return BatchOutcome(frames=None, error=result.error)
    if result.frames is None:
        return BatchOutcome(frames=None, error=PipelineError("The engine returned no frames and no error."))
    # (frames, 3, H, W) floats in [0, 1] -> (frames, H, W, 3) uint8.
    video = (result.frames * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    frames: np.ndarray = video.cpu().numpy()
    return BatchOutcome(frames=frames, error=None)


def _check_range(spec: ModelSpec, name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidParams(
            f"`{name}` must be between {low} and {high} for model {spec.name!r}, but is {value}."
        )


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """The conditioning image at the output size: scaled to cover it, then center-cropped (never distorted)."""
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def load_pipeline(spec: ModelSpec, options: LoadOptions, engine: EngineOptions | None = None) -> VideoPipeline:
    """Load `spec`'s weights (see `models.loading.load_svd_pipeline`) and wrap them for generation.

    An engine `dtype` other than "auto" is loaded directly in that precision (no second copy).
    """
    engine = engine or EngineOptions()
    if engine.dtype != "auto" and options.dtype == "auto":
        options = dataclasses.replace(options, dtype=engine.dtype)
    return VideoPipeline(load_svd_pipeline(spec, options), spec, engine)
