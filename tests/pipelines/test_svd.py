from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from PIL import Image

from models import get_spec
from models.loading import LoadOptions
from pipelines import (
    GenerationCanceled,
    InvalidParams,
    NonFiniteOutput,
    VideoParams,
    VideoPipeline,
    load_pipeline,
)

TINY = get_spec("tiny-random")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> VideoPipeline:
    return load_pipeline(TINY, LoadOptions(models_dir=tmp_path_factory.mktemp("models"), device="cpu"))


@pytest.fixture(scope="session")
def image() -> Image.Image:
    # Non-square, RGBA and not a multiple of 64: exercises convert + cover + center-crop.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (150, 230, 4), dtype=np.uint8), mode="RGBA")


@pytest.fixture
def params(image: Image.Image) -> VideoParams:
    return VideoParams(
        image=image,
        width=TINY.native_width,
        height=TINY.native_height,
        num_frames=TINY.default_num_frames,
        fps=TINY.default_fps,
        motion_bucket_id=TINY.default_motion_bucket_id,
        noise_aug_strength=TINY.default_noise_aug_strength,
        num_inference_steps=TINY.default_steps,
        seed=1234,
        min_guidance_scale=TINY.default_min_guidance_scale,
        max_guidance_scale=TINY.default_max_guidance_scale,
    )


def test_default_video_shape_and_dtype(pipeline: VideoPipeline, params: VideoParams) -> None:
    video = pipeline.generate(params)
    assert video.shape == (8, 64, 64, 3)
    assert video.dtype == np.uint8
    assert video.std() > 0  # not a flat (black) video
    assert pipeline.device == "cpu"


def test_non_native_size_and_frame_count(pipeline: VideoPipeline, params: VideoParams) -> None:
    video = pipeline.generate(
        dataclasses.replace(params, width=128, height=64, num_frames=3, decode_chunk_size=2)
    )
    assert video.shape == (3, 64, 128, 3)
    assert video.dtype == np.uint8


def test_same_seed_same_video_other_seed_other_video(pipeline: VideoPipeline, params: VideoParams) -> None:
    short = dataclasses.replace(params, num_frames=2, num_inference_steps=2)
    first = pipeline.generate(short)
    again = pipeline.generate(short)
    other = pipeline.generate(dataclasses.replace(short, seed=short.seed + 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_progress_is_reported_after_every_step(pipeline: VideoPipeline, params: VideoParams) -> None:
    calls: list[tuple[int, int]] = []
    pipeline.generate(
        dataclasses.replace(params, num_frames=2), on_progress=lambda done, total: calls.append((done, total))
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_after_step_two(pipeline: VideoPipeline, params: VideoParams) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(GenerationCanceled) as info:
        pipeline.generate(
            params,
            on_progress=lambda done, total: calls.append((done, total)),
            should_cancel=lambda: len(calls) >= 2,
        )
    assert calls == [(1, 4), (2, 4)]
    assert (info.value.steps_done, info.value.total_steps) == (2, 4)


def test_cancel_before_the_first_step(pipeline: VideoPipeline, params: VideoParams) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(GenerationCanceled, match="after 0 of 4"):
        pipeline.generate(params, on_progress=lambda d, t: calls.append((d, t)), should_cancel=lambda: True)
    assert calls == []


def test_nan_from_the_vae_raises(
    pipeline: VideoPipeline, params: VideoParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = pipeline.diffusers_pipeline.vae
    real_decode = vae.decode

    def nan_decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> DecoderOutput:
        return DecoderOutput(sample=torch.full_like(real_decode(z, *args, **kwargs).sample, float("nan")))

    monkeypatch.setattr(vae, "decode", nan_decode)
    with pytest.raises(NonFiniteOutput, match="non-finite"):
        pipeline.generate(dataclasses.replace(params, num_frames=2, num_inference_steps=1))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"width": 100},
            "`width` must be a multiple of 64 between 64 and 256 for model 'tiny-random', but is 100.",
        ),
        (
            {"height": 320},
            "`height` must be a multiple of 64 between 64 and 256 for model 'tiny-random', but is 320.",
        ),
        ({"num_frames": 17}, "`num_frames` must be between 2 and 16 for model 'tiny-random', but is 17."),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be between 1 and 50"),
        ({"seed": -1}, "`seed` must be between 0 and"),
        ({"fps": 0}, "`fps` must be at least 1"),
        ({"decode_chunk_size": 0}, "`decode_chunk_size` must be at least 1"),
    ],
)
def test_invalid_params_are_refused_before_running(
    pipeline: VideoPipeline, params: VideoParams, change: dict[str, Any], message: str
) -> None:
    calls: list[tuple[int, int]] = []
    with pytest.raises(InvalidParams) as info:
        pipeline.generate(
            dataclasses.replace(params, **change), on_progress=lambda d, t: calls.append((d, t))
        )
    assert str(info.value).startswith(message)
    assert calls == []


@pytest.mark.gpu
def test_tiny_model_on_cuda(tmp_path: Path, params: VideoParams) -> None:
    cuda = load_pipeline(TINY, LoadOptions(models_dir=tmp_path, device="cuda"))
    assert cuda.device.startswith("cuda")
    assert cuda.diffusers_pipeline.dtype == torch.float16
    first = cuda.generate(params)
    assert first.shape == (8, 64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, cuda.generate(params))
