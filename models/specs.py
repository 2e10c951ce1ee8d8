"""What the service knows about each model before loading it: defaults and accepted ranges."""

from __future__ import annotations

from dataclasses import dataclass

# SVD's VAE downsamples by 8 and its UNet by 8 more, so 64 keeps every level integral.
SIZE_MULTIPLE = 64


@dataclass(frozen=True)
class ModelSpec:
    """Static description of one image-to-video model: hub location, defaults and limits.

    Sizes are in pixels and apply to width and height alike.
    """

    name: str
    hub_id: str | None
    description: str
    is_random: bool
    native_width: int
    native_height: int
    default_num_frames: int
    min_num_frames: int
    max_num_frames: int
    default_steps: int
    min_steps: int
    max_steps: int
    min_size: int
    max_size: int
    default_fps: int
    default_motion_bucket_id: int
    default_noise_aug_strength: float
    default_min_guidance_scale: float
    default_max_guidance_scale: float
    default_decode_chunk_size: int

    def __post_init__(self) -> None:
        # A typo in the registry should fail at import, not as a confusing request error later.
        for field in ("native_width", "native_height", "min_size", "max_size"):
            value = getattr(self, field)
            if value <= 0 or value % SIZE_MULTIPLE:
                raise ValueError(
                    f"{self.name}: `{field}` must be a positive multiple of {SIZE_MULTIPLE}, got {value}."
                )
        _check_range(
            self.name, "num_frames", self.min_num_frames, self.default_num_frames, self.max_num_frames
        )
        _check_range(self.name, "steps", self.min_steps, self.default_steps, self.max_steps)
        _check_range(self.name, "size (width)", self.min_size, self.native_width, self.max_size)
        _check_range(self.name, "size (height)", self.min_size, self.native_height, self.max_size)
        if self.min_num_frames < 1 or self.min_steps < 1:
            raise ValueError(f"{self.name}: frame and step minimums must be at least 1.")
        if self.hub_id is None and not self.is_random:
            raise ValueError(f"{self.name}: a model with real weights needs a `hub_id`.")


def _check_range(model: str, what: str, low: int, default: int, high: int) -> None:
    if not low <= default <= high:
        raise ValueError(f"{model}: default {what} {default} is outside [{low}, {high}].")
