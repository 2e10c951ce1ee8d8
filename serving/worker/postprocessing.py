"""What the PostProcessor deployment does, without Ray: shape the clip, encode, upload.

The frames are first resampled (`interpolate_fps`) and looped (`loop`), then every requested
output is rendered from that one clip, so the MP4, WebM, previews and frames ZIP all agree.
Each object is stored under `{owner}/{jobId}/{name}` with its content type, Cache-Control and
SHA-256; the checksum travels back in `StoredObject` to be recorded on the job.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from serving import media
from serving.observability.tracing import job_span
from serving.settings import Settings
from serving.storage import ObjectStorage, make_storage
from serving.types import PostProcessRequest, PostProcessResult, StoredObject

# Outputs are immutable once written (a job id is never reused), so caches may keep them for a
# year. `private` keeps shared caches out when URLs are presigned per owner; behind a CDN
# (`cdn_base_url`) the CDN is meant to cache them, so they are `public`.
PRIVATE_CACHE_CONTROL = "private, max-age=31536000, immutable"
PUBLIC_CACHE_CONTROL = "public, max-age=31536000, immutable"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class OutputFormat:
    """How one output kind is rendered and stored."""

    name: str  # object name under the job's folder
    content_type: str
    render: Callable[[np.ndarray, int], bytes]  # (frames, fps) -> file bytes


OUTPUT_FORMATS: dict[str, OutputFormat] = {
    "mp4": OutputFormat("video.mp4", media.MP4_CONTENT_TYPE, media.encode_mp4),
    "webm": OutputFormat("video.webm", media.WEBM_CONTENT_TYPE, media.encode_webm),
    "gif": OutputFormat("preview.gif", media.GIF_CONTENT_TYPE, media.encode_gif),
    "webp": OutputFormat("preview.webp", media.WEBP_CONTENT_TYPE, media.encode_webp),
    "thumbnail": OutputFormat(
        "thumbnail.jpg", media.JPEG_CONTENT_TYPE, lambda frames, _fps: media.make_thumbnail(frames[0])
    ),
    "frames": OutputFormat(
        "frames.zip", media.ZIP_CONTENT_TYPE, lambda frames, _fps: media.encode_png_zip(frames)
    ),
}


def output_key(owner_id: str, job_id: str, name: str) -> str:
    return f"{owner_id}/{job_id}/{name}"


class PostProcessingService:
    """Renders and stores a job's outputs; `process` and `discard` are what the Ray
    PostProcessor deployment calls."""

    def __init__(self, settings: Settings, storage: ObjectStorage | None = None) -> None:
        self._storage = storage or make_storage(settings)
        self._interpolation: media.InterpolationMethod = settings.interpolation_method
        self._cache_control = PUBLIC_CACHE_CONTROL if settings.cdn_base_url else PRIVATE_CACHE_CONTROL

    def shape_clip(self, request: PostProcessRequest, frames: np.ndarray) -> tuple[np.ndarray, int]:
        """The frames every output shows and their rate: interpolated, then ping-ponged."""
        fps = request.fps
        if request.interpolate_fps is not None and request.interpolate_fps != fps:
            frames = media.interpolate(frames, fps, request.interpolate_fps, method=self._interpolation)
            fps = request.interpolate_fps
        if request.loop:
            frames = media.ping_pong(frames)
        return frames, fps

    def process(self, request: PostProcessRequest, frames: np.ndarray) -> PostProcessResult:
        with structlog.contextvars.bound_contextvars(job_id=request.job_id, owner_id=request.owner_id):
            with job_span("postprocess", request.job_id):
                result = self._process(request, frames)
            log.info("postprocess_done", outputs=sorted(result.objects), **result.timings)
            return result

    def _process(self, request: PostProcessRequest, frames: np.ndarray) -> PostProcessResult:
        unknown = [kind for kind in request.outputs if kind not in OUTPUT_FORMATS]
        if unknown:
            # The ingress refuses these; a request that gets here anyway is a bug upstream.
            raise ValueError(f"unknown output kinds {unknown}")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        clip, fps = self.shape_clip(request, frames)
        if clip is not frames:
            timings["shape_s"] = round(time.perf_counter() - started, 4)

        # The MP4 always comes first: it is the job's result even when not asked for by name.
        kinds = list(dict.fromkeys(("mp4", *request.outputs)))
        rendered: list[tuple[str, bytes]] = []
        for kind in kinds:
            began = time.perf_counter()
            rendered.append((kind, OUTPUT_FORMATS[kind].render(clip, fps)))
            timings[f"encode_{kind}_s"] = round(time.perf_counter() - began, 4)
        timings["encode_s"] = round(time.perf_counter() - started, 4)

        started = time.perf_counter()
        objects = {kind: self._store(request, kind, data) for kind, data in rendered}
        timings["upload_s"] = round(time.perf_counter() - started, 4)
        return PostProcessResult(job_id=request.job_id, objects=objects, timings=timings)

    def _store(self, request: PostProcessRequest, kind: str, data: bytes) -> StoredObject:
        output = OUTPUT_FORMATS[kind]
        key = output_key(request.owner_id, request.job_id, output.name)
        digest = hashlib.sha256(data).hexdigest()
        self._storage.put(key, data, output.content_type, cache_control=self._cache_control, sha256=digest)
        return StoredObject(
            name=output.name,
            key=key,
            uri=self._storage.uri(key),
            content_type=output.content_type,
            size=len(data),
            sha256=digest,
        )

    def discard(self, request: PostProcessRequest) -> int:
        """Remove a job's outputs (a job canceled while its outputs were being written)."""
        return self._storage.delete_prefix(f"{request.owner_id}/{request.job_id}/")
