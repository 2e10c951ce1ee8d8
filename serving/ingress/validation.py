"""Turn a request into validated `JobParams` before anything is stored (STYLE 5: exact messages)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from models.errors import UnknownModel
from models.registry import get_spec
from pydantic import BaseModel

from models.specs import SIZE_MULTIPLE, ModelSpec
from serving.errors import InvalidInput, UnsupportedMediaType
from serving.ingress.schemas import AnimateOptions
from serving.strict_json import unstorable
from serving.media import interpolated_frame_count, ping_pong_frame_count
from serving.security.images import decode_and_reencode, hidden_trailer, sniff_format
from serving.types import DEFAULT_OUTPUTS, OUTPUT_KINDS, JobParams

ALLOWED_IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
MAX_IMAGE_PIXELS = 4096 * 4096
# Frames after interpolation and looping: bounds what one job holds in memory while it is
# encoded (384 frames of 1024x576 RGB are 680 MB) and how long its outputs play.
MAX_OUTPUT_FRAMES = 384


# Far below Pillow's own bomb limit (89 Mpx): a 12 Mpx phone photo passes, a bomb fails on its header.
MAX_IMAGE_SIDE = 8192
MAX_METADATA_BYTES = 16 * 1024  # `metadata` as compact JSON
MAX_METADATA_DEPTH = 8


@dataclass(frozen=True)
class CheckedImage:
    """An accepted input image, re-encoded as PNG: only its pixels are ever stored."""

    data: bytes
    extension: str
    content_type: str
    width: int
    height: int
    source_format: str = "PNG"  # what the client sent: PNG, JPEG or WEBP


def check_image(data: bytes) -> CheckedImage:
    """Accept PNG, JPEG or WebP that decodes within the pixel limit; refuse other image formats
    with 415, anything else (not an image, truncated, a polyglot, a bomb) with 422."""
    if not data:
        raise InvalidInput("The image is empty.", code="empty_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidInput("The file is not an image we can read (PNG, JPEG or WebP expected).", code="invalid_image")
    if fmt not in ALLOWED_IMAGE_FORMATS:
        raise UnsupportedMediaType(f"Image format {fmt} is not supported; send PNG, JPEG or WebP.",
                                   code="unsupported_image_format")
    if hidden_trailer(data, fmt):
        raise InvalidInput(f"The file carries data after the end of its {fmt} image.", code="invalid_image")
    png, width, height = decode_and_reencode(data, fmt, max_pixels=MAX_IMAGE_PIXELS, max_side=MAX_IMAGE_SIDE)
    return CheckedImage(data=png, extension="png", content_type="image/png", width=width, height=height,
                        source_format=fmt)


def check_storable(body: BaseModel) -> None:
    """Every text and JSON field of a request must be stored and read back intact by both job
    stores: no NUL character (PostgreSQL's text and JSONB refuse it, SQLite keeps it), no lone
    surrogate (not Unicode text), no NaN or infinity (not JSON). Refused here, before anything
    is stored, with the field and the path inside it."""
    for name, field in type(body).model_fields.items():
        problem = unstorable(getattr(body, name), field.alias or name)
        if problem:
            raise InvalidInput(f"{problem}.", code="invalid_input")


def check_metadata(metadata: dict[str, Any] | None) -> None:
    """`metadata` is stored and echoed on every read: bounded in size and nesting."""
    if not metadata:
        return
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise InvalidInput(f"`metadata` is {size} bytes as JSON; at most {MAX_METADATA_BYTES} are accepted.",
                           code="metadata_too_large")

    def depth(value: Any, level: int = 1) -> int:
        if level > MAX_METADATA_DEPTH:
            return level
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return max((depth(child, level + 1) for child in children), default=level)

    if depth(metadata) > MAX_METADATA_DEPTH:
        raise InvalidInput(f"`metadata` is nested deeper than {MAX_METADATA_DEPTH} levels.", code="metadata_too_large")


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

    fps = options.fps if options.fps is not None else spec.default_fps
    check_output_frames(num_frames, fps, options.interpolate_fps, options.loop)
    return JobParams(
        model=spec.name,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        motion_bucket_id=options.motion_bucket_id if options.motion_bucket_id is not None else spec.default_motion_bucket_id,
        noise_aug_strength=options.noise_aug_strength if options.noise_aug_strength is not None else spec.default_noise_aug_strength,
        num_inference_steps=steps,
        seed=options.seed if options.seed is not None else secrets.randbelow(2**32),
        min_guidance_scale=min_guidance,
        max_guidance_scale=max_guidance,
        decode_chunk_size=spec.default_decode_chunk_size,
        outputs=resolve_outputs(options.outputs),
        interpolate_fps=options.interpolate_fps,
        loop=options.loop,
    )


def resolve_outputs(requested: list[str] | None) -> tuple[str, ...]:
    """The outputs to produce, in request order without repeats; the MP4 always comes along."""
    if not requested:
        return DEFAULT_OUTPUTS
    unknown = [name for name in dict.fromkeys(requested) if name not in OUTPUT_KINDS]
    if unknown:
        names = ", ".join(f"`{name}`" for name in unknown)
        raise InvalidInput(
            f"Unknown output {names}; `outputs` may hold {', '.join(OUTPUT_KINDS)}.", code="invalid_outputs"
        )
    outputs = tuple(dict.fromkeys(requested))
    if "mp4" not in outputs:
        outputs = ("mp4", *outputs)  # the video is the job's result; other outputs come with it
    return outputs


def check_output_frames(num_frames: int, fps: int, interpolate_fps: int | None, loop: bool) -> None:
    """Refuse an interpolation target that is not above `fps` or a clip longer than we encode."""
    count = num_frames
    if interpolate_fps is not None:
        if interpolate_fps <= fps:
            raise InvalidInput(
                f"`interpolateFps` must be higher than `fps` ({fps}) but is {interpolate_fps}.",
                code="invalid_interpolate_fps",
            )
        count = interpolated_frame_count(num_frames, fps, interpolate_fps)
    if loop:
        count = ping_pong_frame_count(count)
    if count > MAX_OUTPUT_FRAMES:
        raise InvalidInput(
            f"{num_frames} frames at {fps} fps"
            + (f" interpolated to {interpolate_fps} fps" if interpolate_fps is not None else "")
            + (" and looped" if loop else "")
            + f" make {count} frames; at most {MAX_OUTPUT_FRAMES} are allowed.",
            code="invalid_interpolate_fps" if interpolate_fps is not None else "invalid_num_frames",
        )
