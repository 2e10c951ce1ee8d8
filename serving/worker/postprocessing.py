"""What the PostProcessor deployment does, without Ray: encode, thumbnail, upload."""

from __future__ import annotations

import time

import numpy as np

from serving.media import JPEG_CONTENT_TYPE, MP4_CONTENT_TYPE, encode_mp4, make_thumbnail
from serving.settings import Settings
from serving.storage import ObjectStorage, make_storage
from serving.types import PostProcessRequest, PostProcessResult, StoredObject

# Outputs are immutable once written (a job id is never reused), so caches may keep them.
CACHE_CONTROL = "private, max-age=31536000, immutable"


def output_key(owner_id: str, job_id: str, name: str) -> str:
    return f"{owner_id}/{job_id}/{name}"


class PostProcessingService:
    def __init__(self, settings: Settings, storage: ObjectStorage | None = None) -> None:
        self._storage = storage or make_storage(settings)

    def process(self, request: PostProcessRequest, frames: np.ndarray) -> PostProcessResult:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        rendered: list[tuple[str, str, bytes, str]] = [
            ("mp4", "video.mp4", encode_mp4(frames, request.fps), MP4_CONTENT_TYPE)
        ]
        if "thumbnail" in request.outputs:
            rendered.append(("thumbnail", "thumbnail.jpg", make_thumbnail(frames[0]), JPEG_CONTENT_TYPE))
        timings["encode_s"] = round(time.perf_counter() - started, 4)

        started = time.perf_counter()
        objects: dict[str, StoredObject] = {}
        for kind, name, data, content_type in rendered:
            key = output_key(request.owner_id, request.job_id, name)
            self._storage.put(key, data, content_type, cache_control=CACHE_CONTROL)
            objects[kind] = StoredObject(
                name=name, key=key, uri=self._storage.uri(key), content_type=content_type, size=len(data)
            )
        timings["upload_s"] = round(time.perf_counter() - started, 4)
        return PostProcessResult(job_id=request.job_id, objects=objects, timings=timings)

    def discard(self, request: PostProcessRequest) -> int:
        """Remove a job's outputs (a job canceled while its outputs were being written)."""
        return self._storage.delete_prefix(f"{request.owner_id}/{request.job_id}/")
