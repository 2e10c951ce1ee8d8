"""The Generator's and PostProcessor's work without Ray: tiny model, real Redis, local storage."""

from __future__ import annotations

import dataclasses
import io
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from pipelines.errors import NonFiniteOutput

from serving.errors import JobCanceled, PermanentError, RunHandedBack, SvdServeError
from serving.keys import Keys
from serving.settings import Settings
from serving.storage import LocalStorage
from serving.types import GenerationRequest, JobParams, PostProcessRequest
from serving.worker.generation import GenerationService
from serving.worker.node_drain import DrainState
from serving.worker.postprocessing import PostProcessingService

PARAMS = JobParams(
    model="tiny-random", width=128, height=64, num_frames=5, fps=6, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=3, seed=11, min_guidance_scale=1.0, max_guidance_scale=3.0,
)


@pytest.fixture
def settings(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, redis_url: str, unique_prefix: str) -> Settings:
    return Settings(
        data_dir=tmp_path,
        redis_url=redis_url,
        key_prefix=unique_prefix,
        models_dir=tmp_path_factory.getbasetemp() / "worker-models",
    )


@pytest.fixture
def image_key(settings: Settings) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (80, 50), (10, 200, 40)).save(buf, format="PNG")
    storage = LocalStorage(settings.resolved_storage_dir, "http://x", "secret")
    storage.put("o1/j1/input.png", buf.getvalue(), "image/png")
    return "o1/j1/input.png"


def test_generate_reports_every_step_to_redis(settings: Settings, image_key: str) -> None:
    service = GenerationService(settings)
    result = service.generate(GenerationRequest("j1", image_key, PARAMS))
    assert result.frames.shape == (5, 64, 128, 3) and result.frames.dtype == np.uint8
    assert result.gpu_seconds > 0 and result.device == "cpu"
    progress = redis.Redis.from_url(settings.redis_url or "").hgetall(Keys(settings.key_prefix).progress("j1"))
    assert int(progress[b"step"]) == int(progress[b"steps"]) == 3
    assert progress[b"stage"] == b"denoising"


def test_cancel_flag_stops_generation(settings: Settings, image_key: str) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    client.set(Keys(settings.key_prefix).cancel("j2"), "1", ex=60)
    with pytest.raises(JobCanceled):
        GenerationService(settings).generate(GenerationRequest("j2", image_key, PARAMS))


def test_abandoned_run_stops_without_touching_batch_mates_or_later_runs(settings: Settings, image_key: str) -> None:
    """A drain hands a job back: its run stops at the next step; the job's next run (same job
    id, new run id) and the runs batched with it are not affected."""
    service = GenerationService(settings)
    given_up, kept = GenerationRequest("ja", image_key, PARAMS), GenerationRequest("jb", image_key, PARAMS)
    assert given_up.run_id != kept.run_id
    service.abandon(given_up.run_id)
    stopped, finished = service.generate_many([given_up, kept])
    assert isinstance(stopped, JobCanceled)
    assert not isinstance(finished, BaseException) and finished.frames.shape == (5, 64, 128, 3)
    again = service.generate(GenerationRequest("ja", image_key, PARAMS))
    assert again.frames.shape == (5, 64, 128, 3)


def test_postprocess_stores_video_and_thumbnail_then_discards(settings: Settings) -> None:
    frames = np.random.default_rng(0).integers(0, 255, size=(4, 64, 96, 3), dtype=np.uint8)
    service = PostProcessingService(settings)
    request = PostProcessRequest(job_id="j3", owner_id="o1", fps=6, outputs=("mp4", "thumbnail"))
    result = service.process(request, frames)
    storage = LocalStorage(settings.resolved_storage_dir, "http://x", "secret")
    assert set(result.objects) == {"mp4", "thumbnail"}
    video = result.objects["mp4"]
    assert video.key == "o1/j3/video.mp4" and video.uri == "local://o1/j3/video.mp4"
    assert storage.content_type(video.key) == "video/mp4" and storage.get(video.key)[4:8] == b"ftyp"
    assert storage.content_type("o1/j3/thumbnail.jpg") == "image/jpeg"
    assert service.discard(request) == 2
    assert not storage.exists(video.key)


def test_generate_many_batches_compatible_requests_and_isolates_failures(settings: Settings, image_key: str) -> None:
    from dataclasses import replace

    service = GenerationService(settings.model_copy(update={"max_batch_size": 4}))
    other_size = replace(PARAMS, width=64, seed=5)
    requests = [
        GenerationRequest("b1", image_key, PARAMS),
        GenerationRequest("b2", image_key, replace(PARAMS, seed=99, fps=12, motion_bucket_id=30)),
        GenerationRequest("b3", "o1/missing/input.png", PARAMS),  # its image is gone: only it fails
        GenerationRequest("b4", image_key, other_size),  # another shape: its own loop
    ]
    outcomes = service.generate_many(requests)
    first, second, missing, alone = outcomes
    assert isinstance(missing, Exception)
    assert not isinstance(first, BaseException) and not isinstance(second, BaseException)
    assert not isinstance(alone, BaseException)
    assert first.timings["batch_size"] == second.timings["batch_size"] == 2
    assert alone.timings["batch_size"] == 1 and alone.frames.shape == (5, 64, 64, 3)
    # One loop's time is shared: equal work, equal halves.
    assert first.gpu_seconds == pytest.approx(second.gpu_seconds)
    assert first.gpu_seconds == pytest.approx(first.timings["inference_s"] / 2, rel=1e-3)
    # A request's video does not depend on its batch-mates.
    single = GenerationService(settings).generate(GenerationRequest("b5", image_key, PARAMS))
    np.testing.assert_allclose(single.frames.astype(int), first.frames.astype(int), atol=1)


class GatedService(GenerationService):
    """Holds the denoising after its first step until the test opens the gate (a drain decided
    in the middle of a run, without guessing how fast the machine is)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.first_step = threading.Event()
        self.gate = threading.Event()

    def _report(self, job_id: str, step: int, steps: int, run_id: str | None = None) -> None:
        super()._report(job_id, step, steps, run_id)
        self.first_step.set()
        assert self.gate.wait(60)


@pytest.mark.parametrize("seconds_left", [0.5, 3600.0])
def test_node_drain_hands_back_the_runs_that_would_miss_the_deadline(
    settings: Settings, image_key: str, seconds_left: float
) -> None:
    """A run one step into ten cannot finish in half a second: handed back (its dispatcher runs it
    on another node); with an hour left it finishes here. Either way no new run is taken."""
    service = GatedService(settings)
    service.node_id = "node-a"
    request = GenerationRequest("jd", image_key, dataclasses.replace(PARAMS, num_inference_steps=10))
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(service.generate_many, [request])
        assert service.first_step.wait(60)
        handed = service.node_draining(DrainState(deadline=time.time() + seconds_left))
        service.gate.set()
        (outcome,) = running.result(timeout=120)
    assert not service.accepting
    if seconds_left < 1:
        assert handed == ["jd"] and isinstance(outcome, RunHandedBack) and "node-a" in str(outcome)
    else:
        assert handed == [] and not isinstance(outcome, BaseException)
        assert outcome.frames.shape == (5, 64, 128, 3)
    progress = redis.Redis.from_url(settings.redis_url or "").hgetall(Keys(settings.key_prefix).progress("jd"))
    assert progress[b"node"] == b"node-a"  # where the run ran, for operators


def test_non_finite_output_reaches_the_dispatcher_as_a_permanent_error(
    settings: Settings, image_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine refuses a NaN video with `NonFiniteOutput`; the Generator hands it on as our
    `PermanentError` (the same weights and inputs would fail again), so nothing above the
    Generator needs to know the engine's error types."""
    service = GenerationService(settings)
    pipeline = service._pipeline(PARAMS.model)
    unet = pipeline.diffusers_pipeline.unet
    real = unet.forward

    def nan_forward(sample: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(sample, *args, **kwargs)
        return (torch.full_like(out[0], float("nan")),)

    monkeypatch.setattr(unet, "forward", nan_forward)
    with pytest.raises(PermanentError, match="non-finite|NaN|finite") as raised:
        service.generate(GenerationRequest("nan-1", image_key, PARAMS))
    assert type(raised.value) is PermanentError and raised.value.code == "generation_failed"
    assert isinstance(raised.value, SvdServeError) and not isinstance(raised.value, NonFiniteOutput)
    # The NaN video still ran its denoising loop: the GPU time travels with the error (through
    # Ray's pickling) so the Dispatcher charges it to the owner.
    spent = raised.value.gpu_seconds
    assert spent is not None and spent > 0
    assert pickle.loads(pickle.dumps(raised.value)).gpu_seconds == spent
