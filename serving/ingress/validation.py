"""Turn a request into validated `JobParams` before anything is stored (STYLE 5: exact messages)."""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from models.errors import UnknownModel
from models.registry import get_spec
from models.specs import ModelSpec
from serving.errors import InvalidInput
from serving.ingress.schemas import AnimateOptions
from serving.types import JobParams

ALLOWED_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MAX_IMAGE_PIXELS = 4096 * 4096
SIZE_MULTIPLE = 64


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    extension: str
    content_type: str
    width: int
    height: int


def check_image(data: bytes) -> CheckedImage:
    """Accept PNG, JPEG or WebP that actually decodes; refuse anything else with a clear reason."""
    if not data:
        raise InvalidInput("The image is empty.", code="empty_image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or ""
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidInput(
                    f"The image is {width}x{height}; at most {MAX_IMAGE_PIXELS} pixels are accepted.",
                    code="image_too_large",
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as full:
            full.load()  # verify() does not decode pixel data; a truncated file fails here
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(
            "The file is not an image we can read (PNG, JPEG or WebP expected).", code="invalid_image"
        ) from exc
    if fmt not in ALLOWED_IMAGE_FORMATS:
        raise InvalidInput(
            f"Image format {fmt or 'unknown'} is not supported; send PNG, JPEG or WebP.",
            code="invalid_image",
        )
    ext = ALLOWED_IMAGE_FORMATS[fmt]
    content_type = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[ext]
    return CheckedImage(data=data, extension=ext, content_type=content_type, width=width, height=height)


def _check_range(value: int, low: int, high: int, field: str, model: str, code: str) -> None:
    if not low <= value <= high:
        raise InvalidInput(
            f"`{field}` must be between {low} and {high} for model {model} but is {value}.", code=code
        )


def resolve_params(options: AnimateOptions, default_model: str) -> JobParams:
    """Fill defaults from the model's spec and check every value against its ranges."""
    model = options.model or default_model
    try:
        spec: ModelSpec = get_spec(model)
    except UnknownModel as exc:
        raise InvalidInput(str(exc), code="unknown_model") from exc

    width = options.width if options.width is not None else spec.native_width
    height = options.height if options.height is not None else spec.native_height
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise InvalidInput(
            f"`width` and `height` have to be multiples of {SIZE_MULTIPLE} but are {width} and {height}.",
            code="invalid_size",
        )
    _check_range(width, spec.min_size, spec.max_size, "width", spec.name, "invalid_size")
    _check_range(height, spec.min_size, spec.max_size, "height", spec.name, "invalid_size")

    num_frames = options.num_frames if options.num_frames is not None else spec.default_num_frames
    _check_range(num_frames, spec.min_num_frames, spec.max_num_frames, "numFrames", spec.name, "invalid_num_frames")
    steps = options.num_inference_steps if options.num_inference_steps is not None else spec.default_steps
    _check_range(steps, spec.min_steps, spec.max_steps, "numInferenceSteps", spec.name, "invalid_num_inference_steps")

    min_guidance = options.min_guidance_scale if options.min_guidance_scale is not None else spec.default_min_guidance_scale
    max_guidance = options.max_guidance_scale if options.max_guidance_scale is not None else spec.default_max_guidance_scale
    if min_guidance > max_guidance:
        raise InvalidInput(
            f"`minGuidanceScale` ({min_guidance}) must not exceed `maxGuidanceScale` ({max_guidance}).",
            code="invalid_guidance",
        )

    outputs = tuple(dict.fromkeys(options.outputs)) if options.outputs else ("mp4", "thumbnail")
    if "mp4" not in outputs:
        outputs = ("mp4", *outputs)  # the video is the job's result; other outputs come with it
    return JobParams(
        model=spec.name,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=options.fps if options.fps is not None else spec.default_fps,
        motion_bucket_id=options.motion_bucket_id if options.motion_bucket_id is not None else spec.default_motion_bucket_id,
        noise_aug_strength=options.noise_aug_strength if options.noise_aug_strength is not None else spec.default_noise_aug_strength,
        num_inference_steps=steps,
        seed=options.seed if options.seed is not None else secrets.randbelow(2**32),
        min_guidance_scale=min_guidance,
        max_guidance_scale=max_guidance,
        decode_chunk_size=spec.default_decode_chunk_size,
        outputs=outputs,
    )
