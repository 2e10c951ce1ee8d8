"""Per-request generation parameters."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class VideoParams:
    """Everything one image-to-video generation needs; defaults are filled in at the edge.

    `decode_chunk_size=None` uses the model's default chunk size.
    """

    image: Image.Image
    width: int
    height: int
    num_frames: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    num_inference_steps: int
    seed: int
    min_guidance_scale: float
    max_guidance_scale: float
    decode_chunk_size: int | None = None
