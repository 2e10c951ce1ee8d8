"""Request and response bodies of the public API (camelCase on the wire)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from serving.provider_names import RequestedProvider
from serving.types import OUTPUT_KINDS, JobStatus, Priority

OutputName = Annotated[str, Field(json_schema_extra={"enum": list(OUTPUT_KINDS)})]


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class AnimateOptions(ApiModel):
    """Everything but the image itself; the same fields arrive as JSON or multipart form fields."""

    prompt: str | None = Field(default=None, max_length=2000)
    model: str | None = None
    num_frames: int | None = None
    fps: int | None = Field(default=None, ge=1, le=60)
    motion_bucket_id: int | None = Field(default=None, ge=0, le=1023)
    noise_aug_strength: float | None = Field(default=None, ge=0.0, le=1.0)
    num_inference_steps: int | None = None
    min_guidance_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    max_guidance_scale: float | None = Field(default=None, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    width: int | None = None
    height: int | None = None
    # Plain strings here so that `validation.resolve_outputs` can refuse an unknown name with its
    # own code (`invalid_outputs`); the model's JSON schema still lists the allowed names.
    outputs: list[OutputName] | None = Field(default=None, max_length=16)
    interpolate_fps: int | None = Field(default=None, ge=2, le=60)  # must exceed `fps`
    loop: bool = False  # ping-pong: the clip forwards then backwards
    cache: bool = True  # False: never complete from an identical earlier job
    priority: Priority = Priority.NORMAL
    provider: RequestedProvider = "auto"  # serving.provider_names
    webhook_url: str | None = Field(default=None, max_length=2048)
    metadata: dict[str, Any] | None = None


class AnimateJsonBody(AnimateOptions):
    image_url: str | None = Field(default=None, max_length=4096)
    image_base64: str | None = None


class AcceptedResponse(ApiModel):
    job_id: str
    status: JobStatus
    status_url: str
    events_url: str
    estimated_cost_usd: float | None = None  # on the provider it is expected to run on (issue #6)


class ErrorInfo(ApiModel):
    code: str
    message: str


class JobWarning(ApiModel):
    """Something about the request the service did not honour, though the job runs."""

    code: str
    message: str


class JobStatusResponse(ApiModel):
    job_id: str
    status: JobStatus
    progress: float
    stage: str | None
    queue_position: int | None
    attempts: int
    provider: str
    provider_job_id: str | None
    model: str
    prompt: str | None
    params: dict[str, Any]
    result_url: str | None
    thumbnail_url: str | None
    outputs: dict[str, str]
    checksums: dict[str, str] = {}  # output kind -> hex SHA-256 of its bytes
    cached: bool = False
    cached_from: str | None = None
    retry_of: str | None = None  # the failed job this one re-runs (POST .../{id}/retry)
    # Queued jobs: when it should start, from its queue position and the measured drain rate.
    estimated_start_at: datetime | None = None
    error: ErrorInfo | None
    timings: dict[str, float]
    gpu_seconds: float | None
    cost_usd: float | None
    # Issue #6: why the job went to `provider`, the provider's credits behind `cost_usd`, and
    # what the job was expected to cost.
    routing_reason: str | None = None
    provider_credits: float | None = None
    estimated_cost_usd: float | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    metadata: dict[str, Any]
    warnings: list[JobWarning] = []  # e.g. `prompt_unused`: local SVD animates the image alone


class DeadLetterEntry(ApiModel):
    """A job that ended in `error`: its owner, reason and attempts (admin view)."""

    job_id: str
    owner_id: str
    error: ErrorInfo | None
    attempts: int
    max_attempts: int
    model: str
    retry_of: str | None
    created_at: datetime
    completed_at: datetime | None


class DeadLetterResponse(ApiModel):
    jobs: list[DeadLetterEntry]
    next_cursor: str | None


class JobListResponse(ApiModel):
    jobs: list[JobStatusResponse]
    next_cursor: str | None


class ModelInfo(ApiModel):
    """A model's defaults and accepted ranges: everything a form needs to offer valid values."""

    name: str
    hub_id: str | None
    description: str
    random_weights: bool
    native_width: int
    native_height: int
    default_num_frames: int
    num_frames_range: tuple[int, int]
    default_steps: int
    steps_range: tuple[int, int]
    size_range: tuple[int, int]
    size_multiple: int
    default_fps: int
    fps_range: tuple[int, int]
    default_motion_bucket_id: int
    motion_bucket_id_range: tuple[int, int]
    default_noise_aug_strength: float
    noise_aug_strength_range: tuple[float, float]
    default_min_guidance_scale: float
    default_max_guidance_scale: float
    guidance_scale_range: tuple[float, float]


class RequestLimits(ApiModel):
    """Choices and bounds shared by every model (`GET /api/v1/models`)."""

    outputs: list[str]
    default_outputs: list[str]
    interpolate_fps_range: tuple[int, int]
    max_output_frames: int
    priorities: list[str]
    default_priority: str
    providers: list[str]
    default_provider: str
    seed_range: tuple[int, int]
    max_upload_bytes: int
    image_formats: list[str]


class ModelListResponse(ApiModel):
    models: list[ModelInfo]
    default: str
    limits: RequestLimits


class MeResponse(ApiModel):
    """Who the API key belongs to and what it may do."""

    owner_id: str
    scopes: list[str]
    auth_disabled: bool  # development mode: no key is checked, every caller is owner `local`


class EstimateResponse(ApiModel):
    """What a submission with these fields would cost; nothing is created."""

    provider: str
    estimated_cost_usd: float
    gpu_seconds: float | None = None
    credits: float | None = None
    params: dict[str, Any]  # the job's parameters with every default filled in (seed excluded)


class GeneratorReplicas(ApiModel):
    wanted: int | None
    running: int | None


class AdminOverview(ApiModel):
    """A glance at the service for operators, from the Redis-held aggregates `/metrics` exports
    and the jobs table (spend)."""

    queue_depth: dict[str, int]  # per priority (`none`: jobs without one)
    oldest_wait_s: dict[str, float]  # per priority
    queue_states: dict[str, int]  # per BullMQ state
    generators: GeneratorReplicas
    breakers_open: dict[str, bool]  # per provider
    jobs_finished: dict[str, int]  # per terminal status, since the counters began
    error_rate: float | None  # errors / finished jobs, since the counters began
    month_to_date_usd: float
    metrics_available: bool  # false when Redis could not be read


class UsageResponse(ApiModel):
    """The caller's spending this UTC month: failed jobs that used a GPU or a paid provider count
    too. `forecastUsd` is where the month ends at its rate so far; budget 0 means none."""

    month: str
    spent_usd: float
    forecast_usd: float
    budget_usd: float
    soft_limit_usd: float
