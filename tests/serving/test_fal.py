"""The fal adapter on the real `fal-client` SDK against a loopback server speaking fal's queue
contract (tests/fake_fal.py), driven by the real job runner and routed backend on PostgreSQL and
Redis; its callback goes through the real ingress's provider-webhook route."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image
from pydantic import SecretStr

from serving.backend import StageCallback
from serving.cost import CostEstimate, Prices
from serving.db.engine import make_engine, make_session_factory
from serving.db.jobs import JobRecord, JobRepository
from serving.errors import PermanentError, RetryableError
from serving.ingress.app import create_app
from serving.keys import Keys
from serving.providers.fal import FalBackend, failure_error_code
from serving.providers.routed import RoutedBackend
from serving.providers.router import ProviderRouter
from serving.queue import ConsumedJobInfo
from serving.settings import Settings
from serving.storage import LocalStorage
from serving.types import JobParams, JobStatus, QueuedJob, Rendered, RenderJob
from serving.worker.postprocessing import InProcessPostProcess, PostProcessingService
from serving.worker.runner import JobRunner
from tests.fake_fal import FakeFal, running_fake_fal
from tests.media_checks import ffprobe_video, video_stream_bytes
from tests.serving.events_helpers import make_settings, serve

PARAMS = JobParams(
    model="tiny-random", width=128, height=64, num_frames=14, fps=7, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=42, min_guidance_scale=1.0, max_guidance_scale=3.0,
)


@dataclass
class Local:
    """The local pool of these tests: fails `failures` times (or refuses to be called at all)."""

    failures: int = 0
    must_not_run: bool = False
    name: str = "local"
    calls: int = 0

    async def generate(self, job: RenderJob, on_stage: StageCallback) -> Rendered:
        assert not self.must_not_run, "the local backend was called for a fal job"
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("no GPU")
        return Rendered(np.zeros((4, 64, 64, 3), np.uint8), gpu_seconds=1.0, device="cpu")

    async def health(self) -> bool:
        return True

    def estimate_cost(self, params: JobParams) -> CostEstimate:
        return CostEstimate("local", 0.0)


@dataclass
class Outcomes:
    """Every terminal status the runner announces, per job."""

    seen: dict[str, list[str]] = field(default_factory=dict)

    async def job_changed(self, record: JobRecord, *, queue_position: int | None = None) -> None:
        if record.status.terminal:
            self.seen.setdefault(record.id, []).append(record.status.value)

    async def job_progress(self, job_id: str, **_: object) -> None:
        pass


@dataclass
class Env:
    fake: FakeFal
    settings: Settings
    jobs: JobRepository
    redis: aioredis.Redis
    keys: Keys
    storage: LocalStorage
    backend: FalBackend
    local: Local = field(default_factory=lambda: Local(must_not_run=True))
    outcomes: Outcomes = field(default_factory=Outcomes)

    async def new_job(self, *, provider: str = "pika", prompt: str | None = "waves roll in") -> str:
        job_id = str(uuid.uuid4())
        buf = io.BytesIO()
        Image.new("RGB", (128, 64), (20, 90, 200)).save(buf, format="PNG")
        key = f"o1/{job_id}/input.png"
        self.storage.put(key, buf.getvalue(), "image/png")
        await self.jobs.create(
            job_id=job_id, owner_id="o1", image_url=self.storage.uri(key), params=PARAMS.to_json(),
            model="tiny-random", priority="normal", prompt=prompt, requested_provider=provider,
        )
        return job_id

    def runner(self) -> JobRunner:
        """The runner as the Dispatcher builds it: one routed backend, post-processing after it."""
        router = ProviderRouter.from_settings(self.settings, {"local": self.local, "fal": self.backend})
        prices = Prices.from_settings(self.settings)
        post = InProcessPostProcess(PostProcessingService(self.settings, self.storage))
        routed = RoutedBackend(router, post, self.jobs, prices=prices)
        return JobRunner(self.jobs, routed, self.redis, self.keys, self.outcomes, prices=prices)

    async def job(self, job_id: str) -> JobRecord:
        record = await self.jobs.get(job_id)
        assert record is not None
        return record


@pytest.fixture
def fake() -> Iterator[FakeFal]:
    with running_fake_fal() as server:
        yield server


def fal_settings(tmp_path: Path, database_url: str, redis_url: str, prefix: str, fake: FakeFal) -> Settings:
    return make_settings(
        tmp_path, database_url, redis_url, prefix,
        fal_api_key=SecretStr(fake.api_key), fal_queue_url=fake.base_url, fal_poll_interval_s=0.0,
        allow_http_urls=True, fallback_enabled=True, fallback_provider="fal",
    )


@pytest.fixture
async def env(tmp_path: Path, migrated_pg: str, redis_url: str, unique_prefix: str, fake: FakeFal) -> AsyncIterator[Env]:
    settings = fal_settings(tmp_path, migrated_pg, redis_url, unique_prefix, fake)
    engine = make_engine(migrated_pg)
    client = aioredis.Redis.from_url(redis_url)
    jobs = JobRepository(make_session_factory(engine))
    storage = LocalStorage(settings.resolved_storage_dir, "http://127.0.0.1:8000", "s")
    backend = FalBackend(settings, jobs, client, Keys(unique_prefix), storage=storage)
    try:
        yield Env(fake, settings, jobs, client, Keys(unique_prefix), storage, backend)
    finally:
        await backend.aclose()
        await client.aclose()
        await engine.dispose()


def info(attempt: int = 1, max_attempts: int = 3) -> ConsumedJobInfo:
    return ConsumedJobInfo(attempt=attempt, max_attempts=max_attempts)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_pika_job_is_queued_polled_downloaded_remuxed_and_priced(env: Env) -> None:
    job_id = await env.new_job()
    await env.runner().handle(QueuedJob(job_id, "o1"), info())
    job = await env.job(job_id)
    assert job.status is JobStatus.COMPLETED, job
    (request,) = env.fake.requests.values()
    assert (job.provider, job.provider_job_id, job.routing_reason) == ("fal", request.id, "requested")
    # The queue contract: submitted to the model's full path, status and result without its sub-path.
    assert request.app == "fal-ai/pika" and request.webhook is None
    assert env.fake.count("POST", "/fal-ai/pika/v2.2/image-to-video") == 1
    assert env.fake.count("GET", f"/fal-ai/pika/requests/{request.id}/status") >= 4  # queued twice, running, done
    # Our parameters in Pika's terms: 14 frames at 7 fps -> the 5 s clip.
    body = request.body
    assert body["image_url"].startswith("data:image/png;base64,") and body["prompt"] == "waves roll in"
    assert (body["duration"], body["resolution"], body["seed"]) == (5, "720p", 42)
    # The one post-processing stage kept fal's H.264 stream as it was (remuxed, faststart).
    stored = env.storage.path(job.outputs["mp4"]["key"])
    assert video_stream_bytes(stored.read_bytes()) == video_stream_bytes(env.fake.video)
    assert ffprobe_video(stored)["nb_frames"] == 12 and env.storage.exists(f"o1/{job_id}/thumbnail.jpg")
    # fal's list price: $0.20 per 5 s of Pika v2.2 at 720p.
    assert job.cost_usd == pytest.approx(0.20) and job.provider_credits is None
    assert env.outcomes.seen == {job_id: ["completed"]}


async def test_a_prompt_is_required_unless_a_default_is_set(env: Env) -> None:
    job_id = await env.new_job(prompt=None)
    with pytest.raises(PermanentError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info())
    job = await env.job(job_id)
    assert job.status is JobStatus.ERROR and job.error_code == "prompt_required" and env.fake.submits == 0

    env.settings.fal_default_prompt = "gentle camera drift"
    second = await env.new_job(prompt=None)
    await env.runner().handle(QueuedJob(second, "o1"), info())
    assert (await env.job(second)).status is JobStatus.COMPLETED
    (request,) = env.fake.requests.values()
    assert request.body["prompt"] == "gentle camera drift"


async def test_submit_failures_are_retryable_or_permanent(env: Env) -> None:
    env.fake.fail_submits = [500]
    job_id = await env.new_job()
    with pytest.raises(RetryableError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.job(job_id)
    assert job.status is JobStatus.QUEUED and job.provider_job_id is None and env.fake.requests == {}

    env.settings.fal_resolution = "4k"  # fal validates its input: a 422, which no retry fixes
    with pytest.raises(PermanentError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(2))
    job = await env.job(job_id)
    assert job.status is JobStatus.ERROR and job.error_code == "provider_rejected"
    assert "resolution" in (job.error_message or "")


async def test_a_failed_request_ends_the_job_with_fals_error_type(env: Env) -> None:
    env.fake.error = "The image was flagged by the content checker."
    job_id = await env.new_job()
    with pytest.raises(PermanentError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(1))
    job = await env.job(job_id)
    assert job.status is JobStatus.ERROR and job.error_code == "fal_content_policy_violation"
    assert "flagged" in (job.error_message or "") and env.fake.count("GET", ".mp4") == 0
    assert failure_error_code(None) == "provider_failed"


async def test_cancel_reaches_fal(env: Env) -> None:
    env.fake.script = ("IN_QUEUE",) * 10_000 + ("COMPLETED",)
    env.settings.fal_poll_interval_s = 0.02
    job_id = await env.new_job()
    running = asyncio.create_task(env.runner().handle(QueuedJob(job_id, "o1"), info()))
    await wait_until(lambda: env.fake.count("GET", "/status") >= 3)
    await env.redis.set(env.keys.cancel(job_id), "1")  # what the ingress's cancel does
    await env.jobs.transition(job_id, JobStatus.CANCELED, stage="canceled")
    await asyncio.wait_for(running, timeout=30)
    (request,) = env.fake.requests.values()
    assert env.fake.cancels == [request.id] and request.canceled
    assert (await env.job(job_id)).status is JobStatus.CANCELED


async def test_rerun_after_a_lost_worker_resumes_the_request(env: Env) -> None:
    env.fake.script = ("IN_PROGRESS",) * 10_000 + ("COMPLETED",)
    env.settings.fal_poll_interval_s = 0.02
    job_id = await env.new_job()
    first = asyncio.create_task(env.runner().handle(QueuedJob(job_id, "o1"), info(1)))
    await wait_until(lambda: env.fake.count("GET", "/status") >= 2)
    first.cancel()  # the worker dies mid-poll; the queue hands the job on
    with pytest.raises(asyncio.CancelledError):
        await first
    (request,) = env.fake.requests.values()
    assert (await env.job(job_id)).provider_job_id == request.id

    request.script, request.reads = ["COMPLETED"], 0
    await env.runner().handle(QueuedJob(job_id, "o1"), info(2))
    job = await env.job(job_id)
    assert job.status is JobStatus.COMPLETED and env.fake.submits == 1 and job.provider_job_id == request.id
    assert job.routing_reason == "requested"


async def test_local_failure_on_the_last_attempt_falls_back_to_fal_with_one_outcome(env: Env) -> None:
    env.local = Local(failures=2)
    job_id = await env.new_job(provider="auto")
    with pytest.raises(RetryableError):
        await env.runner().handle(QueuedJob(job_id, "o1"), info(1, max_attempts=2))
    assert env.fake.submits == 0  # not the last attempt: the queue retries locally first
    await env.runner().handle(QueuedJob(job_id, "o1"), info(2, max_attempts=2))
    job = await env.job(job_id)
    assert job.status is JobStatus.COMPLETED and env.local.calls == 2 and env.fake.submits == 1
    assert (job.provider, job.routing_reason) == ("fal", "local_failed")
    assert job.cost_usd == pytest.approx(0.20) and job.gpu_seconds == 0.0
    # Exactly one outcome: one terminal status, one set of outputs.
    assert env.outcomes.seen == {job_id: ["completed"]}
    assert sorted(p.name for p in env.storage.path(f"o1/{job_id}").iterdir()) == [
        "input.png", "thumbnail.jpg", "video.mp4"]


async def test_fals_callback_through_the_ingress_wakes_the_poller(
    env: Env, tmp_path: Path, migrated_pg: str, redis_url: str, unique_prefix: str
) -> None:
    """fal calls the provider-webhook route with the per-job token; the ingress re-reads the
    request from fal and wakes the Dispatcher's poller, which would otherwise sleep an hour."""
    app = create_app(fal_settings(tmp_path, migrated_pg, redis_url, unique_prefix, env.fake))
    with serve(app) as ingress:
        env.settings.fal_webhook_base_url = ingress.base_url
        env.settings.fal_poll_interval_s = 3600.0
        env.fake.hold.clear()  # status reads do not advance: only `finish` completes the request
        job_id = await env.new_job()
        running = asyncio.create_task(env.runner().handle(QueuedJob(job_id, "o1"), info()))
        await wait_until(lambda: env.fake.count("GET", "/status") >= 1)
        (request,) = env.fake.requests.values()
        query = parse_qs(urlsplit(request.webhook or "").query)
        assert request.webhook and request.webhook.startswith(f"{ingress.base_url}/api/v1/provider/webhook/fal?")
        assert query["job"] == [job_id] and query["token"]

        # A forged callback (wrong token) is refused and wakes nobody.
        forged = request.webhook.replace(query["token"][0], "forged")
        async with httpx.AsyncClient() as client:
            assert (await client.post(forged, json={"request_id": request.id, "status": "OK"})).status_code == 401
        assert not running.done()

        await asyncio.to_thread(env.fake.finish, request.id)
        await asyncio.wait_for(running, timeout=60)
        assert request.webhook_answers == [200]
        job = await env.job(job_id)
        assert job.status is JobStatus.COMPLETED and env.outcomes.seen == {job_id: ["completed"]}
