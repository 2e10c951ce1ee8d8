"""The result cache at the ingress, on real Redis, PostgreSQL/SQLite and local storage.

The main test runs a real queue consumer with the real JobRunner, the real GenerationService
(tiny-random model) and the real PostProcessingService, and shows that a repeated request
completes at once and is never seen by the Generator, while `cache: false` goes through it. The
other tests seed the earlier job the quick way (taken off the queue and completed by the runner
with a frame source) and look at when the cache must not answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from serving.backend import StageCallback
from serving.queue import QueueConsumer
from serving.result_cache import cache_applies, input_hash
from serving.settings import Settings
from serving.types import GenerationRequest, JobParams, PostProcessRequest, RenderJob, RenderOutcome, Stage
from serving.uris import key_from_uri
from serving.worker.generation import GenerationService
from serving.worker.postprocessing import PostProcessingService
from serving.worker.runner import JobRunner
from tests.serving.test_ingress import Ingress, png_bytes
from tests.serving.test_outputs import FramesBackend, ingress_settings, run_queued_job, running_ingress, submit

WAIT_S = 60.0
PARAMS = JobParams(
    model="tiny-random", width=64, height=64, num_frames=3, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=9, min_guidance_scale=1.0, max_guidance_scale=3.0,
)  # fmt: skip
REQUEST = {"numFrames": "3", "width": "64", "height": "64", "numInferenceSteps": "2", "seed": "9"}
RANDOM_SEED_REQUEST = {k: v for k, v in REQUEST.items() if k != "seed"}


# The cache key -----------------------------------------------------------------------------------


def test_input_hash_covers_what_shapes_the_result() -> None:
    image = png_bytes()
    base = input_hash(image, PARAMS, prompt=None, provider="auto")
    assert input_hash(image, PARAMS, prompt=None, provider="auto") == base
    variants: list[tuple[bytes, JobParams, str | None, str]] = [
        (png_bytes(color=(1, 2, 3)), PARAMS, None, "auto"),
        (image, dataclasses.replace(PARAMS, seed=10), None, "auto"),
        (image, dataclasses.replace(PARAMS, outputs=("mp4", "gif")), None, "auto"),
        (image, dataclasses.replace(PARAMS, interpolate_fps=14), None, "auto"),
        (image, dataclasses.replace(PARAMS, loop=True), None, "auto"),
        (image, dataclasses.replace(PARAMS, num_inference_steps=3), None, "auto"),
        (image, dataclasses.replace(PARAMS, model="svd"), None, "auto"),
        (image, dataclasses.replace(PARAMS, fps=8), None, "auto"),
        (image, PARAMS, "a cat", "auto"),
        (image, PARAMS, None, "local"),
    ]
    hashes = {input_hash(img, params, prompt=prompt, provider=provider) for img, params, prompt, provider in variants}
    assert len(hashes) == len(variants) and base not in hashes


def test_cache_applies_only_to_fixed_seeds_that_have_not_opted_out(tmp_path: Path) -> None:
    on = Settings(data_dir=tmp_path)
    off = Settings(data_dir=tmp_path, result_cache_enabled=False)
    assert cache_applies(on, seed=0, cache=True)
    assert not cache_applies(on, seed=None, cache=True)  # a random seed never hits
    assert not cache_applies(on, seed=5, cache=False)  # the client opted out
    assert not cache_applies(off, seed=5, cache=True)  # the operator switched it off


# End to end: the Generator is never reached ------------------------------------------------------


@dataclass
class InProcessBackend:
    """LocalRayBackend without Ray: the real Generator and PostProcessor services, called in
    threads as the deployments call them; `generated` lists every job the Generator ran."""

    generation: GenerationService
    post: PostProcessingService
    name: str = "in-process"
    generated: list[str] = field(default_factory=list)

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        self.generated.append(job.job_id)
        await on_stage(Stage.DENOISING, 0.0)
        result = await asyncio.to_thread(
            self.generation.generate, GenerationRequest(job.job_id, job.image_key, job.params)
        )
        await on_stage(Stage.ENCODING, 0.92)
        processed = await asyncio.to_thread(self.post.process, PostProcessRequest.for_job(job), result.frames)
        timings = {**result.timings, **processed.timings}
        return RenderOutcome(processed.objects, result.gpu_seconds, result.device, timings)

    async def discard(self, job: RenderJob) -> None:
        await asyncio.to_thread(self.post.discard, PostProcessRequest.for_job(job))


@dataclass
class Stack:
    ingress: Ingress
    backend: InProcessBackend

    async def status(self, job_id: str) -> dict[str, Any]:
        response = await self.ingress.client.get(f"/api/v1/animate-image/status/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_finished(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            body = await self.status(job_id)
            if body["status"] in ("completed", "error", "canceled"):
                return body
            await asyncio.sleep(0.05)  # polling interval; the deadline bounds the wait
        raise AssertionError(f"job {job_id} did not finish within {WAIT_S}s: {body}")

    async def settled_queue_counts(self) -> dict[str, int]:
        """Queue counts once no job is active (the runner finishes the row before BullMQ
        moves the job to completed)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            counts = await self.ingress.services.queue.counts()
            if counts["active"] == 0:
                return counts
            await asyncio.sleep(0.05)  # polling interval; the deadline bounds the wait
        raise AssertionError(f"a job stayed active for {WAIT_S}s")


@pytest.fixture
async def stack(
    database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    settings = ingress_settings(
        tmp_path, database_url, redis_url, unique_prefix, models_dir=tmp_path_factory.getbasetemp() / "worker-models"
    )
    async with running_ingress(settings, f"alice-{unique_prefix}") as ingress:
        services = ingress.services
        post = PostProcessingService(settings, storage=services.storage)
        backend = InProcessBackend(GenerationService(settings), post)
        runner = JobRunner(services.jobs, backend, services.redis, services.keys)
        consumer = QueueConsumer(settings.redis_url or "", settings.queue_name, runner.handle)
        await consumer.start()
        try:
            yield Stack(ingress, backend)
        finally:
            await consumer.close()


async def test_identical_request_completes_from_the_cache_without_the_generator(stack: Stack) -> None:
    ingress = stack.ingress
    first = await submit(ingress, {**REQUEST, "outputs": "mp4,gif,thumbnail"})
    assert first.status_code == 202, first.text
    first_id = first.json()["jobId"]
    original = await stack.wait_finished(first_id)
    assert original["status"] == "completed" and original["cached"] is False
    assert stack.backend.generated == [first_id]

    # Same image and parameters; priority and metadata do not change the result.
    again = await submit(
        ingress, {**REQUEST, "outputs": "mp4,gif,thumbnail", "priority": "high", "metadata": '{"n": 2}'}
    )
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "completed"
    cached_id = again.json()["jobId"]
    cached = await stack.status(cached_id)
    assert cached["status"] == "completed" and cached["progress"] == 1.0
    assert cached["cached"] is True and cached["cachedFrom"] == first_id
    assert cached["gpuSeconds"] == 0.0 and cached["metadata"] == {"n": 2}
    assert set(cached["outputs"]) == {"mp4", "gif", "thumbnail"}
    assert cached["checksums"] == original["checksums"]
    # The outputs are the earlier job's objects, served through fresh URLs of their own.
    base_url = ingress.services.settings.resolved_public_base_url
    for url in cached["outputs"].values():
        assert f"/{first_id}/" in url
        assert (await ingress.client.get(url.removeprefix(base_url))).status_code == 200
    # Nothing was queued for it and nothing reported progress for it.
    counts = await stack.settled_queue_counts()
    assert counts == {"waiting": 0, "active": 0, "delayed": 0, "completed": 1, "failed": 0}
    assert not await ingress.services.redis.exists(ingress.services.keys.progress(cached_id))

    # Opting out runs the Generator again, and the cached job still never reached it.
    fresh = await submit(ingress, {**REQUEST, "outputs": "mp4,gif,thumbnail", "cache": "false"})
    assert fresh.status_code == 202 and fresh.json()["status"] == "queued"
    fresh_id = fresh.json()["jobId"]
    regenerated = await stack.wait_finished(fresh_id)
    assert regenerated["status"] == "completed" and regenerated["cached"] is False
    assert stack.backend.generated == [first_id, fresh_id]
    # The same seed gives the same video: the cache hands out what generating again would make.
    assert regenerated["checksums"]["mp4"] == original["checksums"]["mp4"]


# When the cache must not answer --------------------------------------------------------------------


@pytest.fixture
async def ingress(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Ingress]:
    settings = ingress_settings(tmp_path, database_url, redis_url, unique_prefix)
    async with running_ingress(settings, f"alice-{unique_prefix}") as running:
        yield running


async def completed_job(ingress: Ingress, fields: dict[str, str], image: bytes | None = None) -> str:
    """Submit through the API, then complete the job as a worker would (frame source, real
    runner and PostProcessingService): an earlier completed job with outputs in storage."""
    response = await submit(ingress, fields, image)
    assert response.status_code == 202 and response.json()["status"] == "queued", response.text
    job_id: str = response.json()["jobId"]
    post = PostProcessingService(ingress.services.settings, storage=ingress.services.storage)
    await run_queued_job(ingress, FramesBackend(post), job_id)
    return job_id


async def submit_again(
    ingress: Ingress, fields: dict[str, str], image: bytes | None = None, **headers: str
) -> dict[str, Any]:
    response = await ingress.client.post(
        "/api/v1/animate-image",
        files={"image": ("in.png", image or png_bytes(), "image/png")},
        data=fields,
        headers=headers,
    )
    assert response.status_code == 202, response.text
    owner_headers = {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}
    status = (
        await ingress.client.get(f"/api/v1/animate-image/status/{response.json()['jobId']}", headers=owner_headers)
    ).json()
    assert isinstance(status, dict)
    return status


async def test_a_seeded_completed_job_is_reused_and_the_cache_can_be_declined(ingress: Ingress) -> None:
    source = await completed_job(ingress, {**REQUEST, "outputs": "webm,frames"})
    hit = await submit_again(ingress, {**REQUEST, "outputs": "webm,frames"})
    assert hit["status"] == "completed" and hit["cached"] is True and hit["cachedFrom"] == source
    assert set(hit["outputs"]) == {"mp4", "webm", "frames"}
    assert await ingress.queued() == 0

    declined = await submit_again(ingress, {**REQUEST, "outputs": "webm,frames", "cache": "false"})
    assert declined["status"] == "queued" and declined["cached"] is False
    assert await ingress.queued() == 1


async def test_a_cached_job_is_never_the_source_of_another(ingress: Ingress) -> None:
    source = await completed_job(ingress, REQUEST)
    first_hit = await submit_again(ingress, REQUEST)
    second_hit = await submit_again(ingress, REQUEST)
    assert first_hit["cachedFrom"] == second_hit["cachedFrom"] == source


MISSES = [
    ("random seed", RANDOM_SEED_REQUEST, RANDOM_SEED_REQUEST),
    ("other seed", REQUEST, {**REQUEST, "seed": "10"}),
    ("other outputs", REQUEST, {**REQUEST, "outputs": "mp4,webp"}),
    ("interpolation", REQUEST, {**REQUEST, "interpolateFps": "14"}),
    ("loop", REQUEST, {**REQUEST, "loop": "true"}),
    ("other steps", REQUEST, {**REQUEST, "numInferenceSteps": "3"}),
    ("prompt", REQUEST, {**REQUEST, "prompt": "a cat"}),
]


@pytest.mark.parametrize("case,earlier,later", MISSES, ids=[c[0] for c in MISSES])
async def test_requests_that_differ_are_generated(
    ingress: Ingress, case: str, earlier: dict[str, str], later: dict[str, str]
) -> None:
    await completed_job(ingress, earlier)
    status = await submit_again(ingress, later)
    assert status["status"] == "queued" and status["cached"] is False
    assert await ingress.queued() == 1


async def test_other_image_bytes_are_generated(ingress: Ingress) -> None:
    await completed_job(ingress, REQUEST, png_bytes(color=(1, 2, 3)))
    status = await submit_again(ingress, REQUEST, png_bytes(color=(1, 2, 4)))
    assert status["cached"] is False and await ingress.queued() == 1


async def test_a_random_seed_job_is_reused_when_its_seed_is_named(ingress: Ingress) -> None:
    source = await completed_job(ingress, RANDOM_SEED_REQUEST)
    record = await ingress.services.jobs.get(source)
    assert record is not None
    status = await submit_again(ingress, {**RANDOM_SEED_REQUEST, "seed": str(record.params["seed"])})
    assert status["cached"] is True and status["cachedFrom"] == source


async def test_another_owner_never_gets_the_result(ingress: Ingress) -> None:
    await completed_job(ingress, REQUEST)
    status = await submit_again(ingress, REQUEST, Authorization="Bearer key-bob")
    assert status["status"] == "queued" and status["cached"] is False


async def test_missing_outputs_mean_a_miss(ingress: Ingress) -> None:
    source = await completed_job(ingress, REQUEST)
    record = await ingress.services.jobs.get(source)
    assert record is not None
    ingress.services.storage.delete(key_from_uri(record.outputs["thumbnail"]["uri"]))
    status = await submit_again(ingress, REQUEST)
    assert status["status"] == "queued" and status["cached"] is False


async def test_the_operator_can_switch_the_cache_off(
    database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path
) -> None:
    settings = ingress_settings(tmp_path, database_url, redis_url, unique_prefix, result_cache_enabled=False)
    async with running_ingress(settings, f"alice-{unique_prefix}") as ingress:
        await completed_job(ingress, REQUEST)
        status = await submit_again(ingress, REQUEST)
    assert status["status"] == "queued" and status["cached"] is False


async def test_idempotency_key_still_wins_over_the_cache(ingress: Ingress) -> None:
    await completed_job(ingress, REQUEST)
    first = await submit_again(ingress, REQUEST, None, **{"Idempotency-Key": "order-9"})
    assert first["cached"] is True
    repeat = await ingress.client.post(
        "/api/v1/animate-image",
        files={"image": ("in.png", png_bytes(), "image/png")},
        data=REQUEST,
        headers={"Idempotency-Key": "order-9"},
    )
    assert repeat.status_code == 200 and repeat.json()["jobId"] == first["jobId"]
    assert await ingress.rows(ingress.owner) == 2
