"""The messages that the ingress, the dispatcher and the Ray deployments exchange.

Nothing else crosses those seams: the ingress writes a `JobParams` into the jobs row and a
`QueuedJob` into the queue; the dispatcher sends a `GenerationRequest` to the Generator, gets a
`GenerationResult`, sends a `PostProcessRequest` to the PostProcessor and gets `PostProcessResult`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

# What a job can make, by the name clients use in `outputs` (rendered by the PostProcessor's
# `OUTPUT_FORMATS`, one format per kind), and what a job makes when it does not say.
OutputKind = Literal["mp4", "webm", "gif", "webp", "thumbnail", "frames"]
OUTPUT_KINDS: tuple[OutputKind, ...] = get_args(OutputKind)
DEFAULT_OUTPUTS: tuple[OutputKind, ...] = ("mp4", "thumbnail")


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELED})
# The stored values, for SQL filters: jobs that have ended, and those still queued or running.
TERMINAL_STATUS_VALUES = tuple(s.value for s in JobStatus if s.terminal)
ACTIVE_STATUS_VALUES = tuple(s.value for s in JobStatus if not s.terminal)

# The only moves a job may make; `serving.db.jobs.transition` enforces them.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING, JobStatus.CANCELED, JobStatus.ERROR}),
    # processing -> queued: the attempt failed in a retryable way and the queue will retry it.
    JobStatus.PROCESSING: frozenset(
        {JobStatus.QUEUED, JobStatus.COMPLETED, JobStatus.ERROR, JobStatus.CANCELED}
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.ERROR: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


class Priority(str, enum.Enum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def queue_priority(self) -> int:
        """BullMQ priority: every job gets one (an unprioritized job would jump the queue)."""
        return {Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}[self]


class Stage(str, enum.Enum):
    QUEUED = "queued"
    LOADING = "loading"
    DENOISING = "denoising"
    DECODING = "decoding"
    ENCODING = "encoding"
    UPLOADING = "uploading"
    DONE = "done"


@dataclass(frozen=True)
class JobParams:
    """Validated generation parameters of one job, as stored in the jobs row (`params`)."""

    model: str
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
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    interpolate_fps: int | None = None  # resample the clip to this rate (None: keep `fps`)
    loop: bool = False  # ping-pong: forwards then backwards

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["outputs"] = list(self.outputs)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobParams":
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "outputs" in values:
            values["outputs"] = tuple(values["outputs"])
        return cls(**values)


@dataclass(frozen=True)
class QueuedJob:
    """What the queue carries: only a reference; the jobs row is the system of record."""

    job_id: str
    owner_id: str


@dataclass(frozen=True)
class RenderJob:
    """One job as a backend sees it: everything needed to produce its outputs, so that no
    backend reads the jobs row again."""

    job_id: str
    owner_id: str
    image_key: str
    params: JobParams
    prompt: str | None = None
    requested_provider: str = "auto"  # what the client asked for: a provider name or `auto`
    # A managed provider's task that an earlier run of this job created (resumed, never re-paid).
    provider: str | None = None
    provider_task_id: str | None = None
    last_attempt: bool = True  # the queue will not retry a failure: the last chance to fall back


@dataclass(frozen=True)
class EncodedVideo:
    """A finished video file a managed provider handed back (MP4 or WebM bytes)."""

    data: bytes


# What a backend makes before post-processing: decoded frames (uint8, (N, H, W, 3)) or a file.
Clip = np.ndarray | EncodedVideo


@dataclass
class Rendered:
    """A backend's clip and its cost basis, before the one post-processing stage."""

    clip: Clip
    gpu_seconds: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    credits: float | None = None  # what a managed provider charged, in its credits
    cost_usd: float | None = None  # what a provider priced per clip charged, in USD


@dataclass
class RenderOutcome:
    """What a backend hands back: stored outputs, cost basis and timings."""

    objects: dict[str, StoredObject]
    gpu_seconds: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    job_id: str
    image_key: str  # object-store key of the input image
    params: JobParams
    # This run of the job: a dispatcher that gives the run up (drain hand-back) stops it by this
    # id, never a later run of the same job on the same replica.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class GenerationResult:
    job_id: str
    frames: np.ndarray  # uint8, (num_frames, height, width, 3)
    gpu_seconds: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PostProcessRequest:
    job_id: str
    owner_id: str
    fps: int
    outputs: tuple[str, ...]
    interpolate_fps: int | None = None
    loop: bool = False

    @classmethod
    def for_job(cls, job: RenderJob) -> "PostProcessRequest":
        """What the PostProcessor needs to know about `job`."""
        params = job.params
        return cls(
            job_id=job.job_id,
            owner_id=job.owner_id,
            fps=params.fps,
            outputs=params.outputs,
            interpolate_fps=params.interpolate_fps,
            loop=params.loop,
        )


@dataclass(frozen=True)
class StoredObject:
    name: str  # "video.mp4", "thumbnail.jpg"
    key: str  # object-store key
    uri: str  # storage URI kept in the jobs row (`local://...`, `s3://bucket/...`)
    content_type: str
    size: int
    sha256: str = ""  # hex digest of the bytes, recorded on the job and on the stored object

    def to_json(self) -> dict[str, Any]:
        """The form kept in the jobs row's `outputs` map."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StoredObject":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class PostProcessResult:
    job_id: str
    objects: dict[str, StoredObject]  # by output kind: "mp4", "thumbnail"
    timings: dict[str, float] = field(default_factory=dict)
