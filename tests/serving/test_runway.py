"""The Runway adapter on the real `runwayml` SDK against a loopback server speaking Runway's REST
contract (tests/fake_runway.py), driven by the real job runner on a real job store and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from PIL import Image
from pydantic import SecretStr

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRecord, JobRepository
from serving.db.migrate import upgrade
from serving.errors import PermanentError, RetryableError
from serving.keys import Keys
from serving.providers.routed import RoutedBackend
from serving.providers.router import ProviderRouter
from serving.providers.runway import RunwayBackend, failure_error_code, pick_ratio
from serving.queue import ConsumedJobInfo
from serving.settings import Settings
from serving.storage import LocalStorage, S3Storage
from serving.types import JobParams, JobStatus, QueuedJob, Rendered, RenderJob
from serving.worker.postprocessing import InProcessPostProcess, PostProcessingService
from serving.worker.runner import JobRunner
from tests.fake_runway import API_VERSION, FakeRunway, running_fake_runway
from tests.media_checks import ffprobe_video, mp4_top_level_boxes, video_stream_bytes
from tests.serving.test_storage import s3_storage  # noqa: F401  (fixture)

PARAMS = JobParams(
    model="tiny-random", width=128, height=64, num_frames=14, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=42, min_guidance_scale=1.0, max_guidance_scale=3.0,
)


class LocalMustNotRun:
    """The local backend of these tests: a job routed to Runway never reaches it."""

    name = "local"

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        raise AssertionError("the local backend was called for a Runway job")


class LocalDown(LocalMustNotRun):
    """A local pool whose every run fails (no GPU comes up)."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        self.calls += 1
        raise RuntimeError("no GPU")

    async def health(self) -> bool:
        return True

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return CostEstimate("local", 0.0)


@dataclass
class Env:
    fake: FakeRunway
    settings: Settings
    jobs: JobRepository
    redis: aioredis.Redis
    keys: Keys
    storage: LocalStorage | S3Storage  # the input image and the outputs
    backend: RunwayBackend
    local: LocalMustNotRun = dataclasses.field(default_factory=LocalMustNotRun)
    outcomes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (job id, terminal status)

    async def new_job(
        self, *, provider: str = "runway", prompt: str | None = "a calm sea", params: JobParams = PARAMS
    ) -> str:
        job_id = str(uuid.uuid4())
        buf = io.BytesIO()
        Image.new("RGB", (128, 64), (20, 90, 200)).save(buf, format="PNG")
        key = f"o1/{job_id}/input.png"
        self.storage.put(key, buf.getvalue(), "image/png")
        await self.jobs.create(
            job_id=job_id, owner_id="o1", image_url=self.storage.uri(key), params=params.to_json(),
            model="tiny-random", priority="normal", prompt=prompt, requested_provider=provider,
        )
        return job_id

    def runner(self) -> JobRunner:
        """The runner as the Dispatcher builds it: one routed backend, post-processing after it."""
        router = ProviderRouter.from_settings(self.settings, {"local": self.local, "runway": self.backend})
        prices = Prices.from_settings(self.settings)
        post = InProcessPostProcess(PostProcessingService(self.settings, self.storage))
        routed = RoutedBackend(router, post, self.jobs, prices=prices)
        return JobRunner(self.jobs, routed, self.redis, self.keys, self, prices=prices)

    # The runner's event sink: the terminal statuses it announces.
    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None:
        if record.status.terminal:
            self.outcomes.append((record.id, record.status.value))

    async def job_progress(self, job_id: str, **_: object) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[FakeRunway]:
    with running_fake_runway() as server:
        yield server


@pytest.fixture
async def env(tmp_path: Path, redis_url: str, unique_prefix: str, fake: FakeRunway) -> AsyncIterator[Env]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    await asyncio.to_thread(upgrade, url)
    settings = Settings(
        data_dir=tmp_path, key_prefix=unique_prefix, runway_api_key=SecretStr(fake.api_key),
        runway_base_url=fake.base_url, runway_poll_interval_s=0.0, runway_poll_max_interval_s=0.0,
        allow_private_urls=True, allow_http_urls=True, fallback_enabled=True,
    )
    engine = make_engine(url)
    client = aioredis.Redis.from_url(redis_url)
    jobs = JobRepository(make_session_factory(engine))
    storage = LocalStorage(settings.resolved_storage_dir, "http://127.0.0.1:8000", "s")
    backend = RunwayBackend(settings, jobs, client, Keys(unique_prefix), storage=storage)
    try:
        yield Env(fake, settings, jobs, client, Keys(unique_prefix), storage, backend)
    finally:
        await backend.aclose()
        await client.aclose()
        await engine.dispose()


def moov_at_end(mp4: bytes) -> bytes:
    """The same stream remuxed without faststart: `moov` after `mdat`."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.mp4", Path(tmp) / "out.mp4"
        src.write_bytes(mp4)
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", str(src), "-c", "copy",
                        str(out)], check=True, timeout=60)
        return out.read_bytes()


def info(attempt: int = 1, max_attempts: int = 3) -> ConsumedJobInfo:
    return ConsumedJobInfo(attempt=attempt, max_attempts=max_attempts)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_runway_job_completes_with_outputs_copied_remuxed_and_costed(env: Env) -> None:
    env.fake.video = moov_at_end(env.fake.video)  # as a plain encoder writes it: not streamable
    job_id = await env.new_job()
    await env.runner().handle(QueuedJob(job_id, "o1"), info())
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED, job
    (task_id,) = env.fake.tasks
    assert job.provider == "runway" and job.provider_job_id == task_id and job.routing_reason == "requested"
    # What the SDK sent, as Runway documents it.
    body = env.fake.tasks[task_id].body
    assert body["model"] == "gen4_turbo" and body["ratio"] == "1280:720" and body["duration"] == 5
    assert body["seed"] == 42 and body["promptText"] == "a calm sea"
    assert body["promptImage"].startswith("data:image/png;base64,")
    # Polled through PENDING, THROTTLED, RUNNING to SUCCEEDED, then the output fetched once.
    assert env.fake.count("GET", "/v1/tasks/") == 4 and env.fake.downloads == [200]
    # Copied into our storage, remuxed (faststart), not re-encoded: the very same H.264 stream.
    mp4 = job.outputs["mp4"]
    assert mp4["key"] == f"o1/{job_id}/video.mp4" and job.result_url == mp4["uri"]
    stored = env.storage.path(mp4["key"])
    probe = ffprobe_video(stored)
    assert probe["codec_name"] == "h264" and probe["pix_fmt"] == "yuv420p"
    assert (probe["width"], probe["height"]) == (64, 64) and probe["nb_frames"] == 12
    assert video_stream_bytes(stored.read_bytes()) == video_stream_bytes(env.fake.video)
    assert mp4_top_level_boxes(env.fake.video).index("moov") > mp4_top_level_boxes(env.fake.video).index("mdat")
    boxes = mp4_top_level_boxes(stored.read_bytes())
    assert boxes.index("moov") < boxes.index("mdat")  # faststart: playable while it downloads
    assert env.storage.exists(f"o1/{job_id}/thumbnail.jpg")
    # Cost: Runway's credits at the configured credit price (5 s x 5 credits x $0.01).
    assert job.provider_credits == 25 and job.cost_usd == pytest.approx(0.25)
    assert {"provider_s", "download_s", "remux_s", "upload_s"} <= set(job.timings)
    assert "encode_mp4_s" not in job.timings


async def test_a_runway_video_that_needs_shaping_is_decoded_and_re_encoded(env: Env) -> None:
    """A loop (or interpolation) changes the frames: then, and only then, the video is decoded
    and post-processed like our own frames, at the provider's frame rate."""
    job_id = await env.new_job(params=dataclasses.replace(PARAMS, loop=True))
    await env.runner().handle(QueuedJob(job_id, "o1"), info())
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED, job
    probe = ffprobe_video(env.storage.path(job.outputs["mp4"]["key"]))
    assert probe["nb_frames"] == 22 and probe["r_frame_rate"] == 24  # 12 frames ping-ponged, at Runway's rate
    assert {"decode_s", "encode_mp4_s"} <= set(job.timings)
    assert video_stream_bytes(env.storage.get(job.outputs["mp4"]["key"])) != video_stream_bytes(env.fake.video)


async def test_local_failure_on_the_last_attempt_falls_back_to_runway_with_one_outcome(env: Env) -> None:
    env.local = LocalDown()
    job_id = await env.new_job(provider="auto")
    with pytest.raises(RetryableError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(1, max_attempts=2))
    assert env.fake.tasks == {} and env.outcomes == []  # the queue retries locally first
    await env.runner().handle(QueuedJob(job_id, "o1"), info(2, max_attempts=2))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED, job
    (task_id,) = env.fake.tasks
    assert (job.provider, job.routing_reason, job.provider_job_id) == ("runway", "local_failed", task_id)
    assert env.local.calls == 2 and job.provider_credits == 25 and job.cost_usd == pytest.approx(0.25)
    # Exactly one outcome: one terminal status, one set of outputs.
    assert env.outcomes == [(job_id, "completed")]
    assert sorted(p.name for p in env.storage.path(f"o1/{job_id}").iterdir()) == [
        "input.png", "thumbnail.jpg", "video.mp4"]


async def test_failed_create_is_sent_once_and_the_job_retried_by_our_queue(env: Env) -> None:
    env.fake.fail_creates = [500]
    job_id = await env.new_job()
    with pytest.raises(RetryableError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(1))
    # The SDK did not retry the POST (max_retries=0 on create): one attempt, no task.
    assert env.fake.create_attempts == 1 and env.fake.tasks == {}
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.QUEUED and job.provider_job_id is None

    env.fake.fail_creates = [429]
    with pytest.raises(RetryableError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(2))
    assert env.fake.create_attempts == 2 and env.fake.tasks == {}

    await env.runner().handle(QueuedJob(job_id, "o1"), info(3))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED and len(env.fake.tasks) == 1


async def test_rerun_after_a_lost_worker_resumes_the_task_instead_of_creating_another(env: Env) -> None:
    env.fake.script = ("PENDING",) * 10_000 + ("SUCCEEDED",)
    env.settings.runway_poll_interval_s = 0.02
    job_id = await env.new_job()
    first = asyncio.create_task(env.runner().handle(QueuedJob(job_id, "o1"), info(1)))
    await wait_until(lambda: env.fake.count("GET", "/v1/tasks/") >= 2)
    first.cancel()  # the worker dies mid-poll; its lease lapses and the queue hands the job on
    with pytest.raises(asyncio.CancelledError):
        await first
    (task_id,) = env.fake.tasks
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.PROCESSING and job.provider_job_id == task_id

    env.fake.tasks[task_id].script = ["SUCCEEDED"]
    await env.runner().handle(QueuedJob(job_id, "o1"), info(2))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED and job.provider_job_id == task_id
    assert env.fake.create_attempts == 1 and len(env.fake.tasks) == 1
    assert job.routing_reason == "requested"  # the resume kept why the job went to Runway


async def test_cancel_reaches_runway(env: Env) -> None:
    env.fake.script = ("PENDING", "THROTTLED") + ("RUNNING",) * 10_000
    env.settings.runway_poll_interval_s = 0.02
    job_id = await env.new_job()
    running = asyncio.create_task(env.runner().handle(QueuedJob(job_id, "o1"), info()))
    await wait_until(lambda: env.fake.count("GET", "/v1/tasks/") >= 3)
    # What the ingress's cancel does: the flag, then the guarded transition.
    await env.redis.set(env.keys.cancel(job_id), "1")
    await env.jobs.transition(job_id, JobStatus.CANCELED, stage="canceled")
    await asyncio.wait_for(running, timeout=10)
    (task_id,) = env.fake.tasks
    assert env.fake.deletes == [task_id] and env.fake.tasks[task_id].deleted
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.CANCELED


async def test_failed_task_carries_runway_failure_code(env: Env) -> None:
    env.fake.script = ("PENDING", "RUNNING", "FAILED")
    env.fake.failure_code = "SAFETY.INPUT.IMAGE"
    env.fake.failed_credits = 10  # charged despite the failure: recorded on the job
    job_id = await env.new_job()
    with pytest.raises(PermanentError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.ERROR
    assert job.error_code == "runway_safety_input_image" and "SAFETY.INPUT.IMAGE" in (job.error_message or "")
    assert env.fake.downloads == []
    assert job.provider_credits == 10 and job.cost_usd == pytest.approx(0.10)


async def test_expired_output_url_is_refreshed_from_the_task(env: Env) -> None:
    env.fake.expire_next_outputs = 1
    job_id = await env.new_job()
    await env.runner().handle(QueuedJob(job_id, "o1"), info())
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED
    assert env.fake.downloads == [403, 200]


async def test_a_throttled_poll_is_retried(env: Env) -> None:
    env.fake.fail_polls = [429]
    job_id = await env.new_job()
    await env.runner().handle(QueuedJob(job_id, "o1"), info())
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED and env.fake.create_attempts == 1


async def test_health_and_auth(env: Env) -> None:
    assert await env.backend.health() is True
    env.fake.healthy = False
    assert await env.backend.health() is False
    env.fake.healthy = True
    wrong = RunwayBackend(
        env.settings.model_copy(update={"runway_api_key": SecretStr("key_wrong")}),
        env.jobs, env.redis, env.keys, storage=env.storage,
    )
    try:
        assert await wrong.health() is False
    finally:
        await wrong.aclose()
    async with httpx.AsyncClient(base_url=env.fake.base_url) as client:
        auth = {"Authorization": f"Bearer {env.fake.api_key}"}
        assert (await client.get("/v1/organization", headers=auth)).status_code == 400  # no version header
        ok = await client.get("/v1/organization", headers={**auth, "X-Runway-Version": API_VERSION})
        assert ok.status_code == 200


def test_ratio_and_failure_code_mapping() -> None:
    assert pick_ratio("gen4_turbo", 1024, 576) == "1280:720"
    assert pick_ratio("gen4_turbo", 576, 1024) == "720:1280"
    assert pick_ratio("gen4_turbo", 512, 512) == "960:960"
    assert pick_ratio("gen3a_turbo", 1024, 576) == "1280:768"
    with pytest.raises(PermanentError):
        pick_ratio("gen2", 64, 64)
    assert failure_error_code("INTERNAL.BAD_OUTPUT.CODE01") == "runway_internal_bad_output_code01"
    assert failure_error_code(None) == "provider_failed"


async def test_outputs_are_copied_into_s3(env: Env, s3_storage: S3Storage, tmp_path: Path) -> None:
    job_id = await env.new_job()
    key = f"o1/{job_id}/input.png"
    s3_storage.put(key, env.storage.get(key), "image/png")  # the input lives where the outputs go
    env.backend = RunwayBackend(env.settings, env.jobs, env.redis, env.keys, storage=s3_storage)
    env.storage = s3_storage
    try:
        await env.runner().handle(QueuedJob(job_id, "o1"), info())
    finally:
        await env.backend.aclose()
    job = await env.jobs.get(job_id)
    assert job is not None and job.status is JobStatus.COMPLETED
    assert job.result_url is not None and job.result_url.startswith("s3://")
    video = tmp_path / "copied.mp4"
    video.write_bytes(await asyncio.to_thread(s3_storage.get, f"o1/{job_id}/video.mp4"))
    probe = ffprobe_video(video)
    assert probe["codec_name"] == "h264" and probe["nb_frames"] == 12
