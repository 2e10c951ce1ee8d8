"""What `GET /api/v1/models` tells a client: each model's defaults and ranges, and the choices
every request shares. The ranges are read from where they are enforced (the model's spec and the
constraints of `AnimateOptions`), so a form built from this answer offers only accepted values."""

from __future__ import annotations

from typing import Any, get_args

from annotated_types import Ge, Le

from models.specs import SIZE_MULTIPLE, ModelSpec
from serving.ingress.schemas import AnimateOptions, ModelInfo, RequestLimits
from serving.ingress.validation import ALLOWED_IMAGE_FORMATS, MAX_OUTPUT_FRAMES
from serving.settings import Settings
from serving.types import DEFAULT_OUTPUTS, OUTPUT_KINDS, Priority


def field_range(name: str) -> tuple[Any, Any]:
    """The inclusive (ge, le) bounds declared on an `AnimateOptions` field."""
    low = high = None
    for item in AnimateOptions.model_fields[name].metadata:
        if isinstance(item, Ge):
            low = item.ge
        elif isinstance(item, Le):
            high = item.le
    if low is None or high is None:
        raise LookupError(f"AnimateOptions.{name} declares no ge/le bounds")
    return low, high


def model_info(spec: ModelSpec) -> ModelInfo:
    return ModelInfo(
        name=spec.name,
        hub_id=spec.hub_id,
        description=spec.description,
        random_weights=spec.is_random,
        native_width=spec.native_width,
        native_height=spec.native_height,
        default_num_frames=spec.default_num_frames,
        num_frames_range=(spec.min_num_frames, spec.max_num_frames),
        default_steps=spec.default_steps,
        steps_range=(spec.min_steps, spec.max_steps),
        size_range=(spec.min_size, spec.max_size),
        size_multiple=SIZE_MULTIPLE,
        default_fps=spec.default_fps,
        fps_range=field_range("fps"),
        default_motion_bucket_id=spec.default_motion_bucket_id,
        motion_bucket_id_range=field_range("motion_bucket_id"),
        default_noise_aug_strength=spec.default_noise_aug_strength,
        noise_aug_strength_range=field_range("noise_aug_strength"),
        default_min_guidance_scale=spec.default_min_guidance_scale,
        default_max_guidance_scale=spec.default_max_guidance_scale,
        guidance_scale_range=field_range("min_guidance_scale"),
    )


def request_limits(settings: Settings) -> RequestLimits:
    provider_field = AnimateOptions.model_fields["provider"]
    return RequestLimits(
        outputs=list(OUTPUT_KINDS),
        default_outputs=list(DEFAULT_OUTPUTS),
        interpolate_fps_range=field_range("interpolate_fps"),
        max_output_frames=MAX_OUTPUT_FRAMES,
        priorities=[p.value for p in Priority],
        default_priority=AnimateOptions.model_fields["priority"].default.value,
        providers=list(get_args(provider_field.annotation)),
        default_provider=provider_field.default,
        seed_range=field_range("seed"),
        max_upload_bytes=settings.max_upload_bytes,
        image_formats=sorted(ALLOWED_IMAGE_FORMATS),
    )
