"""Tiny-model fixtures for the engine tests: fresh pipelines (options mutate modules) and mixed requests."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from models import get_spec
from models.specs import ModelSpec
from models.tiny_random import tiny_random_pipeline
from pipelines import EngineOptions, VideoParams, VideoPipeline

TINY: ModelSpec = get_spec("tiny-random")


def make_image(seed: int, size: tuple[int, int] = (90, 70)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_params(**changes: object) -> VideoParams:
    params = VideoParams(
        image=make_image(0),
        width=64,
        height=64,
        num_frames=4,
        fps=7,
        motion_bucket_id=127,
        noise_aug_strength=0.02,
        num_inference_steps=3,
        seed=1,
        min_guidance_scale=1.0,
        max_guidance_scale=3.0,
        decode_chunk_size=2,
    )
    return dataclasses.replace(params, **changes)  # type: ignore[arg-type]


def mixed_params() -> list[VideoParams]:
    """Three requests sharing a batch key and nothing else; the second needs no guidance at all."""
    return [
        make_params(),
        make_params(image=make_image(1, (64, 64)), fps=12, motion_bucket_id=30, noise_aug_strength=0.1, seed=99,
                    min_guidance_scale=0.5, max_guidance_scale=1.0, decode_chunk_size=3),
        make_params(image=make_image(2, (200, 120)), fps=3, motion_bucket_id=200, noise_aug_strength=0.0, seed=7,
                    min_guidance_scale=2.0, max_guidance_scale=5.0, decode_chunk_size=4),
    ]


def engine(options: EngineOptions | None = None) -> VideoPipeline:
    """A VideoPipeline on a fresh tiny pipeline (CPU, float32)."""
    return VideoPipeline(tiny_random_pipeline(), TINY, options)


def diffusers_frames(pipe: StableVideoDiffusionPipeline, params: VideoParams, fitted: Image.Image) -> torch.Tensor:
    """diffusers' own output for `params`: (frames, 3, H, W) in [0, 1].

    Seed mapping: one `torch.Generator(device).manual_seed(seed)` per request, exactly what
    diffusers draws the image noise and then the initial latents from.
    """
    out = pipe(
        image=fitted,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        min_guidance_scale=params.min_guidance_scale,
        max_guidance_scale=params.max_guidance_scale,
        fps=params.fps,
        motion_bucket_id=params.motion_bucket_id,
        noise_aug_strength=params.noise_aug_strength,
        decode_chunk_size=params.decode_chunk_size,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="pt",
    )
    frames: torch.Tensor = out.frames[0]
    return frames


@pytest.fixture
def reference_engine() -> VideoPipeline:
    return engine()
