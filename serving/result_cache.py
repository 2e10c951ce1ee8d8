"""The result cache: a request identical to an earlier completed one completes at once.

Identical means the same owner, the same image bytes, and the same everything that shapes the
result: the generation parameters (model, size, frames, fps, motion, noise, steps, guidance,
seed), the outputs asked for, interpolation, looping, prompt and provider. Priority, webhook
URL, metadata and the Idempotency-Key change nothing in the result and are left out.

Only a request with an explicit seed looks the cache up: a client that leaves the seed out asks
for a fresh random video, and gets one. (A job with a random seed still records its hash: a
later request that names that seed reproduces it and may be served from it.)

A hit references the earlier job's output objects instead of copying them. Outputs are
immutable (a job id is never reused, nothing rewrites an object) and the cache only matches jobs
of the same owner, so the referenced keys are already that owner's and the status endpoint signs
fresh URLs for them as for any output. Referencing costs no storage and no time, where a copy of
a frames ZIP would cost both; the price is that a job's outputs may be shared: whatever deletes
outputs (a retention sweep) must keep objects that a `cached_from` job still points at. The new
job stores its own input image, so it stays self-contained for a retry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time

import structlog

from serving.db.jobs import JobRecord
from serving.errors import InvalidTransition, NotFound
from serving.lifecycle import JobLifecycle
from serving.settings import Settings
from serving.storage import ObjectStorage
from serving.types import JobParams, JobStatus
from serving.uris import key_from_uri

log = structlog.get_logger(__name__)

# Bumped when what goes into the hash changes, so old hashes can never match new requests.
HASH_VERSION = "svd-serve/input-hash/2"
CACHE_STAGE = "cache"


def input_hash(image: bytes, params: JobParams, *, prompt: str | None, provider: str) -> str:
    """The cache key of a request (kept in the jobs row's `input_hash`)."""
    described = {"params": params.to_json(), "prompt": prompt, "provider": provider}
    digest = hashlib.sha256(HASH_VERSION.encode() + b"\0")
    # The image's own digest, not its bytes: the JSON that follows can then never be mistaken
    # for the tail of an image.
    digest.update(hashlib.sha256(image).digest())
    digest.update(json.dumps(described, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def cache_applies(settings: Settings, *, seed: int | None, cache: bool) -> bool:
    """Whether a request may be served from the cache: enabled, not declined, seed fixed."""
    return settings.result_cache_enabled and cache and seed is not None


class ResultCache:
    """Finds a job to reuse and completes a new job from it, without the queue or the GPU."""

    def __init__(self, lifecycle: JobLifecycle, storage: ObjectStorage) -> None:
        self._lifecycle = lifecycle  # a hit's transitions are announced like any job's
        self._jobs = lifecycle.jobs
        self._storage = storage

    async def find(self, owner_id: str, request_hash: str) -> JobRecord | None:
        """The owner's newest generated job with this hash whose outputs are all still stored."""
        source = await self._jobs.find_cache_source(owner_id, request_hash)
        if source is None or not source.outputs:
            return None  # a job completed before outputs were recorded cannot be reused
        keys = [key_from_uri(str(stored["uri"])) for stored in source.outputs.values()]
        present = await asyncio.gather(*(asyncio.to_thread(self._storage.exists, key) for key in keys))
        if not all(present):
            # A lifecycle rule or an operator removed something: generate afresh.
            log.warning("result_cache_outputs_missing", job_id=source.id, owner_id=owner_id)
            return None
        return source

    async def complete(self, record: JobRecord, source: JobRecord) -> JobRecord:
        """Move the new, never enqueued job `record` to completed with `source`'s outputs.

        It goes queued -> processing -> completed like any job, through the one guarded
        transition, so whatever watches those transitions sees a cached job as well.
        """
        started = time.perf_counter()
        try:
            await self._lifecycle.transition(record.id, JobStatus.PROCESSING, stage=CACHE_STAGE, progress=0.0)
            # Its one outcome, announced like any job's: a `completed` event, webhook and count.
            completed = await self._lifecycle.transition(
                record.id,
                JobStatus.COMPLETED,
                result_url=source.result_url,
                thumbnail_url=source.thumbnail_url,
                outputs=source.outputs,
                cached=True,
                cached_from=source.id,
                provider=source.provider,
                gpu_seconds=0.0,
                timings={"cache_s": round(time.perf_counter() - started, 4), "total_s": _since(record)},
            )
        except InvalidTransition:
            # Canceled in the instant between insert and completion: that outcome stands.
            current = await self._jobs.get(record.id)
            if current is None:
                raise NotFound(f"Job {record.id} was not found.") from None
            return current
        log.info("job_completed_from_cache", job_id=record.id, owner_id=record.owner_id, cached_from=source.id)
        return completed


def _since(record: JobRecord) -> float:
    """Seconds from the job's creation until now."""
    return round((dt.datetime.now(dt.timezone.utc) - record.created_at).total_seconds(), 4)
