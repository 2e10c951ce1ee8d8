"""Batched Stable Video Diffusion sampling with per-request parameters.

The steps are diffusers' `StableVideoDiffusionPipeline.__call__`, numbered the same way, with
every per-request quantity kept per row so that a request's result does not depend on its
batch-mates: its own generator (image noise, then initial latents, in diffusers' order), its own
fps / motion bucket / noise augmentation (added time ids), its own guidance ramp, its own decode.
Rows that need no classifier-free guidance (max guidance <= 1) get no unconditional UNet pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.batch import CancelFn, ProgressFn
from pipelines.errors import CallbackFailed, GenerationCanceled, NonFiniteOutput, OutOfMemory, PipelineError
from pipelines.faults import is_finite, is_out_of_memory, release_memory
from pipelines.optimize import Denoiser, EngineRuntime
from pipelines.options import EngineOptions
from pipelines.params import VideoParams


@dataclass(frozen=True)
class SampleRequest:
    """One row of a batch: parameters, its conditioning image (already fitted to width x height),
    the decode chunk it will use, and its callbacks."""

    params: VideoParams
    image: Image.Image
    decode_chunk: int
    on_progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None


@dataclass
class SampleResult:
    """Final latents (frames, 4, h, w) and frames (frames, 3, H, W) in [0, 1] on the device, or an error."""

    latents: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    error: PipelineError | None = None


@dataclass
class StageTimings:
    """Wall time of the last `sample` call per stage (device-synchronised), and the UNet work done."""

    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    unet_calls: int = 0
    unet_rows_full: int = 0  # sum over steps of the UNet batch size, full UNet passes
    unet_rows_cached: int = 0  # the same for DeepCache's shallow passes


class _Scheduler(Protocol):
    """The two calls of a diffusers scheduler the loop makes (Euler for every SVD checkpoint)."""

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> Any: ...


class DenoiseOutOfMemory(Exception):
    """The device ran out of memory while encoding or denoising; nothing of the batch is kept.

    Raised outside the handler that caught the original error, so no traceback pins its tensors.
    """


@dataclass
class _Rows:
    """The live rows of the denoising loop and their conditioning, rebuilt when a row drops out."""

    members: list[int]  # index into the batch's requests, one per row
    embeddings: torch.Tensor  # (n, 1, D) CLIP image embeddings
    image_latents: torch.Tensor  # (n, frames, 4, h, w) VAE latents of the noised conditioning image
    time_ids: torch.Tensor  # (n, 3): fps - 1, motion bucket, noise augmentation
    guidance: torch.Tensor  # (n, frames, 1, 1, 1): min -> max guidance over the frames
    needs_cfg: list[bool]
    _cfg_index: torch.Tensor = field(init=False)
    _image_in: torch.Tensor = field(init=False)
    _context_in: torch.Tensor = field(init=False)
    _time_ids_in: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        # UNet rows: [unconditional rows of the guided requests] + [conditional rows of all], the
        # layout diffusers uses ([uncond; cond]) when every request is guided.
        cfg = [row for row, guided in enumerate(self.needs_cfg) if guided]
        self._cfg_index = torch.tensor(cfg, dtype=torch.long, device=self.embeddings.device)
        uncond_image = torch.zeros_like(self.image_latents[self._cfg_index])
        self._image_in = torch.cat([uncond_image, self.image_latents])
        self._context_in = torch.cat([torch.zeros_like(self.embeddings[self._cfg_index]), self.embeddings])
        self._time_ids_in = torch.cat([self.time_ids[self._cfg_index], self.time_ids])

    @property
    def cfg_rows(self) -> int:
        return int(self._cfg_index.numel())

    def select(self, keep: list[int]) -> _Rows:
        index = torch.tensor(keep, dtype=torch.long, device=self.embeddings.device)
        return _Rows(
            members=[self.members[row] for row in keep],
            embeddings=self.embeddings[index],
            image_latents=self.image_latents[index],
            time_ids=self.time_ids[index],
            guidance=self.guidance[index],
            needs_cfg=[self.needs_cfg[row] for row in keep],
        )

    def unet_rows(self, keep: list[int]) -> list[int]:
        """The UNet rows (as laid out now) of the rows in `keep`, in the layout `select(keep)` builds."""
        cfg = [row for row, guided in enumerate(self.needs_cfg) if guided]
        uncond = [cfg.index(row) for row in keep if self.needs_cfg[row]]
        return uncond + [len(cfg) + row for row in keep]

    def unet_inputs(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.cat([scaled[self._cfg_index], scaled]) if self.cfg_rows else scaled
        return torch.cat([rows, self._image_in], dim=2), self._context_in, self._time_ids_in

    def guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        k = self.cfg_rows
        uncond, cond = noise_pred[:k], noise_pred[k:]
        if k == 0:
            return cond
        if k == len(self.members):
            return uncond + self.guidance * (cond - uncond)  # diffusers' expression, all rows guided
        guided = uncond + self.guidance[self._cfg_index] * (cond[self._cfg_index] - uncond)
        return cond.index_copy(0, self._cfg_index, guided)


class SVDSampler:
    """Runs one denoising loop for a batch of requests sharing size, frame count and step count."""

    def __init__(self, pipe: StableVideoDiffusionPipeline, runtime: EngineRuntime, options: EngineOptions) -> None:
        self._pipe = pipe
        self._runtime = runtime
        self._options = options
        self.timings = StageTimings()

    def sample(
        self, requests: Sequence[SampleRequest], *, decode: bool = True, eager: bool = False
    ) -> list[SampleResult]:
        """Sample every request; per-request failures (cancel, NaN, decode OOM) land in its result.

        `eager` runs the uncompiled denoiser (the out-of-memory rung with chunked feed-forward).
        Raises `DenoiseOutOfMemory` when the device runs out of memory before the decode.
        """
        self.timings = StageTimings()
        results = [SampleResult() for _ in requests]
        total = requests[0].params.num_inference_steps if requests else 0
        # 0. A request canceled while it waited never touches the device.
        live = [i for i, request in enumerate(requests) if not _stopped(request, results[i], 0, total)]
        if not live:
            return results

        out_of_memory = ""
        try:
            with torch.inference_mode():
                final = self._encode_and_denoise(requests, results, live, eager)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            out_of_memory = str(exc)
        if out_of_memory:
            release_memory(self._device)
            raise DenoiseOutOfMemory(out_of_memory)

        started = time.perf_counter()
        with torch.inference_mode():
            for index, latents in final.items():
                results[index].latents = latents
                if decode:
                    self._decode_request(requests[index], results[index], latents)
        self._sync()
        self.timings.decode_s = time.perf_counter() - started
        if self._runtime.offloaded:
            self._pipe.maybe_free_model_hooks()
        return results

    @property
    def _device(self) -> torch.device:
        # With model CPU offload the modules sit on the CPU between calls; this is where they run.
        return self._pipe._execution_device

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    # -- steps 1-7: encode, prepare, denoise ---------------------------------------------------
    def _encode_and_denoise(
        self, requests: Sequence[SampleRequest], results: list[SampleResult], live: list[int], eager: bool
    ) -> dict[int, torch.Tensor]:
        pipe, device = self._pipe, self._device
        batch = [requests[i] for i in live]
        first = batch[0].params
        started = time.perf_counter()

        # 1. Encode the conditioning images with CLIP: (n, 1, D).
        embeddings = pipe._encode_image([r.image for r in batch], device, 1, False)
        dtype = embeddings.dtype

        # 2. Noise-augment each image with its own generator, then VAE-encode: (n, 4, h, w).
        generators = [torch.Generator(device=device).manual_seed(r.params.seed) for r in batch]
        images = pipe.video_processor.preprocess([r.image for r in batch], height=first.height, width=first.width)
        images = images.to(device)
        noised = torch.cat([
            images[row : row + 1]
            + r.params.noise_aug_strength
            * randn_tensor(images[row : row + 1].shape, generator=generators[row], device=device, dtype=images.dtype)
            for row, r in enumerate(batch)
        ])
        image_latents = self._encode_vae(noised).to(dtype)
        image_latents = image_latents.unsqueeze(1).repeat(1, first.num_frames, 1, 1, 1)

        # 3. Added time ids per request (the UNet was micro-conditioned on fps - 1).
        time_ids = torch.tensor(
            [[r.params.fps - 1, r.params.motion_bucket_id, r.params.noise_aug_strength] for r in batch], dtype=dtype
        ).to(device)

        # 4. Timesteps, on a scheduler of our own so a failed or split batch leaves no state behind.
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(first.num_inference_steps, device=device)
        timesteps = scheduler.timesteps

        # 5. Initial latents, each from its request's generator (after its image noise).
        latent_shape = (
            1,
            first.num_frames,
            pipe.unet.config.in_channels // 2,
            first.height // pipe.vae_scale_factor,
            first.width // pipe.vae_scale_factor,
        )
        latents = torch.cat([randn_tensor(latent_shape, generator=g, device=device, dtype=dtype) for g in generators])
        latents = latents * scheduler.init_noise_sigma

        # 6. Guidance ramps, first frame -> last frame, per request.
        guidance = torch.cat([
            torch.linspace(r.params.min_guidance_scale, r.params.max_guidance_scale, first.num_frames).unsqueeze(0)
            for r in batch
        ]).to(device, latents.dtype)
        rows = _Rows(
            members=list(live),
            embeddings=embeddings,
            image_latents=image_latents,
            time_ids=time_ids,
            guidance=guidance[:, :, None, None, None],
            needs_cfg=[max(r.params.min_guidance_scale, r.params.max_guidance_scale) > 1 for r in batch],
        )
        self._sync()
        self.timings.encode_s = time.perf_counter() - started

        # 7. The denoising loop.
        started = time.perf_counter()
        denoiser = self._runtime.eager_denoiser if eager else self._runtime.denoiser
        final = self._denoise(denoiser, scheduler, timesteps, latents, rows, requests, results)
        self._sync()
        self.timings.denoise_s = time.perf_counter() - started
        return final

    def _encode_vae(self, images: torch.Tensor) -> torch.Tensor:
        vae = self._pipe.vae
        device = self._device
        # diffusers encodes in fp32 under an fp16 VAE (`force_upcast`); without the upcast we fall
        # back to fp32 only if the fp16 latents overflowed.
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast and self._options.vae_encode_upcast
        if not upcast:
            latents = self._pipe._encode_vae_image(images, device, 1, False)
            if vae.dtype == torch.float32 or is_finite(latents):
                return latents
        with self._vae_in_float32():
            return self._pipe._encode_vae_image(images, device, 1, False)

    def _denoise(
        self,
        denoiser: Denoiser,
        scheduler: _Scheduler,
        timesteps: torch.Tensor,
        latents: torch.Tensor,
        rows: _Rows,
        requests: Sequence[SampleRequest],
        results: list[SampleResult],
    ) -> dict[int, torch.Tensor]:
        interval = self._options.deepcache_interval if self._options.uses_deepcache else 0
        total = len(timesteps)
        deep: torch.Tensor | None = None
        for step, t in enumerate(timesteps):
            scaled = scheduler.scale_model_input(latents, t)
            sample, context, time_ids = rows.unet_inputs(scaled)
            cached = interval > 0 and deep is not None and step % interval != 0
            noise_pred, fresh = denoiser(sample, t, context, time_ids, deep if cached else None)
            if not cached:
                deep = fresh
            self._count_unet(sample.shape[0], cached)
            latents = scheduler.step(rows.guide(noise_pred), t, latents).prev_sample

            # Progress and cancellation, per request; a stopped request leaves the batch now.
            keep = [
                row for row, index in enumerate(rows.members)
                if not _stopped(requests[index], results[index], step + 1, total)
            ]
            if len(keep) < len(rows.members):
                if not keep:
                    return {}
                if deep is not None:
                    # The cache is per UNet row: keep the survivors' own, so that their next steps are
                    # what they would have been without the cancel (a reset would force a full step).
                    deep = _select_unet_rows(deep, rows.unet_rows(keep), sample.shape[0])
                latents, rows = latents[keep], rows.select(keep)
        return {index: latents[row] for row, index in enumerate(rows.members)}

    def _count_unet(self, batch_rows: int, cached: bool) -> None:
        self.timings.unet_calls += 1
        if cached:
            self.timings.unet_rows_cached += batch_rows
        else:
            self.timings.unet_rows_full += batch_rows

    # -- step 8: decode, per request -----------------------------------------------------------
    def _decode_request(self, request: SampleRequest, result: SampleResult, latents: torch.Tensor) -> None:
        seed = request.params.seed
        if not is_finite(latents):
            result.error = NonFiniteOutput(
                f"The UNet produced non-finite latents (NaN or inf) for seed {seed}; this usually means a "
                "float16 overflow: retry with another seed or in bfloat16/float32."
            )
            return
        scaled = 1 / self._pipe.vae.config.scaling_factor * latents
        chunk = request.decode_chunk
        if self._runtime.max_decode_chunk is not None:
            chunk = min(chunk, self._runtime.max_decode_chunk)

        frames, error = self._decode_with_oom_ladder(scaled, chunk, self._runtime.decode)
        retry_fp32 = self._options.nan_fp32_retry and self._pipe.vae.dtype != torch.float32
        if frames is not None and not is_finite(frames) and retry_fp32:
            # Usually an fp16 overflow in the decoder; fp32 has the range it lacked.
            with self._vae_in_float32():
                frames, error = self._decode_with_oom_ladder(scaled, chunk, self._eager_decode)
        if error is not None:
            result.error = error
            return
        assert frames is not None  # the ladder returns frames or an error
        if not is_finite(frames):
            retried = " (also after a float32 retry)" if retry_fp32 else ""
            result.error = NonFiniteOutput(
                f"The VAE decoded non-finite values (NaN or inf) for seed {seed}{retried}; "
                "refusing to deliver a black video."
            )
            return
        # 9. [-1, 1] -> [0, 1], as diffusers' video processor does.
        result.frames = (frames.float() * 0.5 + 0.5).clamp(0, 1)

    def _decode_with_oom_ladder(
        self, scaled: torch.Tensor, chunk: int, decode: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> tuple[torch.Tensor | None, PipelineError | None]:
        failure = ""
        try:
            return self._decode_chunks(scaled, chunk, decode), None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failure = str(exc)
        release_memory(self._device)
        smaller = max(1, chunk // 2)
        if not self._options.oom_retry or smaller == chunk:
            return None, OutOfMemory(f"Out of device memory decoding {chunk} frames at a time: {failure}")
        try:
            # Eager: a compiled decoder would compile a graph for the new chunk length, under memory pressure.
            return self._decode_chunks(scaled, smaller, self._eager_decode), None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            failure = str(exc)
        release_memory(self._device)
        return None, OutOfMemory(
            f"Out of device memory decoding {chunk} and then {smaller} frames at a time: {failure}"
        )

    def _decode_chunks(
        self, scaled: torch.Tensor, chunk: int, decode: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        # One request at a time: the temporal decoder mixes the frames of a chunk, so a chunk must
        # never span two videos.
        dtype = self._pipe.vae.dtype
        parts = [
            decode(scaled[start : start + chunk].to(dtype), scaled[start : start + chunk].shape[0])
            for start in range(0, scaled.shape[0], chunk)
        ]
        return torch.cat(parts)

    def _eager_decode(self, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        # The eager module on purpose: a compiled decoder would recompile for the new dtype.
        sample: torch.Tensor = self._pipe.vae.decode(latents, num_frames=num_frames).sample
        return sample

    @contextmanager
    def _vae_in_float32(self) -> Iterator[None]:
        vae = self._pipe.vae
        original = vae.dtype
        vae.to(dtype=torch.float32)
        try:
            yield
        finally:
            vae.to(dtype=original)


def _select_unet_rows(features: torch.Tensor, index: list[int], unet_rows: int) -> torch.Tensor:
    """Rows `index` of features flattened as (UNet rows x frames, ...), flattened the same way."""
    per_row = features.reshape(unet_rows, -1, *features.shape[1:])
    return per_row[torch.tensor(index, dtype=torch.long, device=features.device)].flatten(0, 1)


def _stopped(request: SampleRequest, result: SampleResult, done: int, total: int) -> bool:
    """Report progress (after a step) and ask whether to cancel; records why a request stopped."""
    try:
        if done and request.on_progress is not None:
            request.on_progress(done, total)
        if request.should_cancel is not None and request.should_cancel():
            result.error = GenerationCanceled(done, total)
            return True
    except Exception as exc:
        error = CallbackFailed(f"A progress or cancel callback raised {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        result.error = error
        return True
    return False
