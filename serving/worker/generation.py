"""What the Generator deployment does, without Ray: load once, then run one request at a time."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
import redis
import structlog
from PIL import Image

from models.loading import LoadOptions
from models.registry import get_spec
from pipelines import VideoPipeline, load_pipeline
from pipelines.errors import GenerationCanceled
from pipelines.params import VideoParams
from serving.errors import JobCanceled
from serving.events import SyncEventPublisher
from serving.keys import PROGRESS_TTL_S, Keys
from serving.settings import Settings
from serving.storage import ObjectStorage, make_storage
from serving.types import GenerationRequest, GenerationResult, Stage

log = structlog.get_logger(__name__)

# Denoising is most of a job; the rest of the bar belongs to encoding and upload.
DENOISE_SHARE = 0.9

PipelineLoader = Callable[[str, LoadOptions], VideoPipeline]


def default_loader(model: str, options: LoadOptions) -> VideoPipeline:
    return load_pipeline(get_spec(model), options)


class GenerationService:
    """Holds loaded pipelines (one per model) and runs requests, reporting progress to Redis."""

    def __init__(self, settings: Settings, loader: PipelineLoader = default_loader) -> None:
        self._settings = settings
        self._loader = loader
        self._options = LoadOptions(
            models_dir=settings.resolved_models_dir, offline=settings.offline, device=settings.device
        )
        self._pipelines: dict[str, VideoPipeline] = {}
        self._storage: ObjectStorage = make_storage(settings)
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set: the generator reports progress through Redis.")
        self._redis = redis.Redis.from_url(settings.redis_url)
        self._keys = Keys(settings.key_prefix)
        self._events = SyncEventPublisher(
            self._redis, self._keys, ttl_s=settings.events_ttl_s, max_len=settings.events_max_len
        )

    def warm_up(self, model: str) -> None:
        """Load weights before the replica reports ready (STYLE 3/11)."""
        self._pipeline(model)

    def _pipeline(self, model: str) -> VideoPipeline:
        if model not in self._pipelines:
            started = time.perf_counter()
            self._pipelines[model] = self._loader(model, self._options)
            log.info("pipeline_loaded", model=model, seconds=round(time.perf_counter() - started, 2))
        return self._pipelines[model]

    def _report(self, job_id: str, step: int, steps: int) -> None:
        key = self._keys.progress(job_id)
        fraction = DENOISE_SHARE * step / max(steps, 1)
        self._redis.hset(key, mapping={"progress": f"{fraction:.4f}", "stage": Stage.DENOISING.value,
                                       "step": step, "steps": steps})
        self._redis.expire(key, PROGRESS_TTL_S)
        try:
            self._events.progress(job_id, stage=Stage.DENOISING.value, progress=fraction, step=step, steps=steps)
        except redis.RedisError as exc:  # a missed progress event must not stop the denoising
            log.warning("progress_event_failed", job_id=job_id, error=repr(exc))

    def _canceled(self, job_id: str) -> bool:
        return bool(self._redis.exists(self._keys.cancel(job_id)))

    def generate(self, request: GenerationRequest) -> GenerationResult:
        params = request.params
        pipeline = self._pipeline(params.model)
        image = Image.open(io.BytesIO(self._storage.get(request.image_key))).convert("RGB")
        video_params = VideoParams(
            image=image,
            width=params.width,
            height=params.height,
            num_frames=params.num_frames,
            fps=params.fps,
            motion_bucket_id=params.motion_bucket_id,
            noise_aug_strength=params.noise_aug_strength,
            num_inference_steps=params.num_inference_steps,
            seed=params.seed,
            min_guidance_scale=params.min_guidance_scale,
            max_guidance_scale=params.max_guidance_scale,
            decode_chunk_size=params.decode_chunk_size,
        )
        started = time.perf_counter()
        try:
            frames: np.ndarray = pipeline.generate(
                video_params,
                on_progress=lambda step, steps: self._report(request.job_id, step, steps),
                should_cancel=lambda: self._canceled(request.job_id),
            )
        except GenerationCanceled as exc:
            raise JobCanceled(f"Job {request.job_id} was canceled during generation.") from exc
        seconds = time.perf_counter() - started
        return GenerationResult(
            job_id=request.job_id,
            frames=frames,
            gpu_seconds=seconds,
            device=pipeline.device,
            timings={"inference_s": round(seconds, 4)},
        )
