from __future__ import annotations

import dataclasses

import pytest

from models import ModelSpec, UnknownModel, get_spec, list_specs


def test_lists_the_four_models_in_order() -> None:
    assert [spec.name for spec in list_specs()] == ["svd", "svd-xt", "svd-xt-1-1", "tiny-random"]


@pytest.mark.parametrize(
    ("name", "hub_id", "frames", "fps"),
    [
        ("svd", "stabilityai/stable-video-diffusion-img2vid", 14, 7),
        ("svd-xt", "stabilityai/stable-video-diffusion-img2vid-xt", 25, 7),
        ("svd-xt-1-1", "stabilityai/stable-video-diffusion-img2vid-xt-1-1", 25, 6),
    ],
)
def test_real_models(name: str, hub_id: str, frames: int, fps: int) -> None:
    spec = get_spec(name)
    assert (spec.hub_id, spec.default_num_frames, spec.max_num_frames, spec.default_fps) == (
        hub_id,
        frames,
        frames,
        fps,
    )
    assert not spec.is_random
    assert (spec.native_width, spec.native_height) == (1024, 576)
    assert (spec.min_num_frames, spec.min_steps, spec.default_steps, spec.max_steps) == (2, 1, 25, 100)
    assert (spec.min_size, spec.max_size) == (64, 1024)
    assert (spec.default_motion_bucket_id, spec.default_noise_aug_strength) == (127, 0.02)
    assert (spec.default_min_guidance_scale, spec.default_max_guidance_scale) == (1.0, 3.0)


def test_tiny_random_says_it_is_random() -> None:
    spec = get_spec("tiny-random")
    assert spec.is_random and spec.hub_id is None
    assert "random" in spec.description.lower() and "noise" in spec.description.lower()
    assert (spec.native_width, spec.native_height, spec.default_num_frames, spec.default_steps) == (
        64,
        64,
        8,
        4,
    )
    assert (spec.min_num_frames, spec.max_num_frames, spec.min_steps, spec.max_steps) == (2, 16, 1, 50)
    assert (spec.min_size, spec.max_size) == (64, 256)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModel) as info:
        get_spec("svd-9000")
    assert str(info.value) == "Unknown model 'svd-9000'; known models: svd, svd-xt, svd-xt-1-1, tiny-random."
    assert info.value.known == ["svd", "svd-xt", "svd-xt-1-1", "tiny-random"]


def test_specs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("svd").max_steps = 1000  # type: ignore[misc]


def test_spec_refuses_sizes_off_the_64_grid() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        dataclasses.replace(get_spec("svd"), native_height=600)


def test_spec_refuses_defaults_outside_their_range() -> None:
    with pytest.raises(ValueError, match="num_frames 30 is outside"):
        dataclasses.replace(get_spec("svd"), default_num_frames=30)


def test_every_spec_is_a_model_spec() -> None:
    assert all(isinstance(spec, ModelSpec) for spec in list_specs())
