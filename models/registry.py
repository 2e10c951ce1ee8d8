"""The models this service can serve, by name."""

from __future__ import annotations

from models.errors import UnknownModel
from models.specs import ModelSpec


def _real_model(name: str, hub_id: str, description: str, num_frames: int, fps: int) -> ModelSpec:
    # Defaults follow Stability AI's model cards and diffusers' pipeline defaults; the released
    # checkpoints differ only in frame count and the fps they were conditioned on.
    return ModelSpec(
        name=name,
        hub_id=hub_id,
        description=description,
        is_random=False,
        native_width=1024,
        native_height=576,
        default_num_frames=num_frames,
        min_num_frames=2,
        max_num_frames=num_frames,
        default_steps=25,
        min_steps=1,
        max_steps=100,
        min_size=64,
        max_size=1024,
        default_fps=fps,
        default_motion_bucket_id=127,
        default_noise_aug_strength=0.02,
        default_min_guidance_scale=1.0,
        default_max_guidance_scale=3.0,
        default_decode_chunk_size=8,
    )


_SPECS: tuple[ModelSpec, ...] = (
    _real_model(
        "svd",
        "stabilityai/stable-video-diffusion-img2vid",
        "Stable Video Diffusion: 14 frames at 1024x576.",
        num_frames=14,
        fps=7,
    ),
    _real_model(
        "svd-xt",
        "stabilityai/stable-video-diffusion-img2vid-xt",
        "Stable Video Diffusion XT: 25 frames at 1024x576.",
        num_frames=25,
        fps=7,
    ),
    _real_model(
        "svd-xt-1-1",
        "stabilityai/stable-video-diffusion-img2vid-xt-1-1",
        "Stable Video Diffusion XT 1.1: 25 frames at 1024x576, conditioned on 6 fps.",
        num_frames=25,
        fps=6,
    ),
    ModelSpec(
        name="tiny-random",
        hub_id=None,
        description=(
            "Tiny model with RANDOM weights, built locally: it produces noise-like video. "
            "For tests and demos only."
        ),
        is_random=True,
        native_width=64,
        native_height=64,
        default_num_frames=8,
        min_num_frames=2,
        max_num_frames=16,
        default_steps=4,
        min_steps=1,
        max_steps=50,
        min_size=64,
        max_size=256,
        default_fps=7,
        default_motion_bucket_id=127,
        default_noise_aug_strength=0.02,
        default_min_guidance_scale=1.0,
        default_max_guidance_scale=3.0,
        default_decode_chunk_size=8,
    ),
)

_BY_NAME: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name`; raises `UnknownModel` listing the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownModel(name, list(_BY_NAME)) from None


def list_specs() -> list[ModelSpec]:
    """Every registered spec, in registry order."""
    return list(_SPECS)
