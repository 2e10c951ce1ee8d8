"""Every output a client can ask for: rendered by the real PostProcessingService with the real
ffmpeg, stored on LocalStorage and on a real S3 server (SeaweedFS) with content type,
Cache-Control and SHA-256, recorded on the job by the real JobRunner, and handed out by the real
ingress as fresh URLs. Only the Generator is replaced, by a frame source: these tests are about
what happens to frames, not how they are made."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.backend import StageCallback
from serving.ingress.app import create_app
from serving.queue import ConsumedJobInfo
from serving.settings import Settings
from serving.storage import LocalStorage, S3Storage
from serving.types import JobStatus, PostProcessRequest, QueuedJob, RenderJob, RenderOutcome, Stage
from serving.worker.postprocessing import (
    OUTPUT_FORMATS,
    PRIVATE_CACHE_CONTROL,
    PUBLIC_CACHE_CONTROL,
    PostProcessingService,
)
from serving.worker.runner import JobRunner
from tests.media_checks import animated_image_info, decode_rgb_frames, ffprobe_codec, ffprobe_video
from tests.serving.test_ingress import Ingress, png_bytes
from tests.serving.test_storage import BASE_URL, SECRET, s3_storage, storage  # noqa: F401  (fixtures)

ALL_OUTPUTS = ("mp4", "webm", "gif", "webp", "thumbnail", "frames")
EXPECTED_NAMES = {
    "mp4": ("video.mp4", "video/mp4"),
    "webm": ("video.webm", "video/webm"),
    "gif": ("preview.gif", "image/gif"),
    "webp": ("preview.webp", "image/webp"),
    "thumbnail": ("thumbnail.jpg", "image/jpeg"),
    "frames": ("frames.zip", "application/zip"),
}


def clip(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth pan over a seeded pattern: frames that video codecs and interpolation treat
    like real footage (random noise would not interpolate meaningfully)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height // 8 + 2, width // 8 + 2 + count, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
    return np.stack([big[:height, index * 4 : index * 4 + width] for index in range(count)])


def service_settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, interpolation_method="blend", **overrides)  # type: ignore[arg-type]


def object_headers(storage: LocalStorage | S3Storage, key: str) -> tuple[str, str | None, str | None]:
    """(content type, cache control, sha256 hex) as the backend keeps them."""
    if isinstance(storage, S3Storage):
        head = storage.client.head_object(Bucket=storage.bucket, Key=key, ChecksumMode="ENABLED")
        # S3's own checksum (verified on upload) and our metadata copy must agree.
        s3_sha = base64.b64decode(head["ChecksumSHA256"]).hex()
        assert head["Metadata"]["sha256"] == s3_sha
        return head["ContentType"], head.get("CacheControl"), s3_sha
    return storage.content_type(key), storage.cache_control(key), storage.checksum_sha256(key)


# PostProcessingService on both storage backends ------------------------------------------------


def test_every_output_is_stored_with_type_cache_control_and_checksum(
    storage: LocalStorage | S3Storage, tmp_path: Path
) -> None:
    service = PostProcessingService(service_settings(tmp_path), storage=storage)
    request = PostProcessRequest(job_id="j1", owner_id="owner-a", fps=7, outputs=ALL_OUTPUTS)
    result = service.process(request, clip(8, 64, 96))

    assert set(result.objects) == set(ALL_OUTPUTS)
    for kind, stored in result.objects.items():
        name, content_type = EXPECTED_NAMES[kind]
        assert stored.name == name and stored.key == f"owner-a/j1/{name}"
        assert stored.uri == storage.uri(stored.key) and stored.content_type == content_type
        data = storage.get(stored.key)
        assert stored.size == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
        assert object_headers(storage, stored.key) == (content_type, PRIVATE_CACHE_CONTROL, stored.sha256)
    assert {f"encode_{kind}_s" for kind in ALL_OUTPUTS} | {"encode_s", "upload_s"} <= set(result.timings)

    assert service.discard(request) == len(ALL_OUTPUTS)
    assert not any(storage.exists(stored.key) for stored in result.objects.values())


def test_each_output_format_checked_with_ffprobe(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage", BASE_URL, SECRET)
    service = PostProcessingService(service_settings(tmp_path), storage=storage)
    request = PostProcessRequest(job_id="j2", owner_id="o", fps=6, outputs=ALL_OUTPUTS)
    result = service.process(request, clip(10, 128, 192))
    files = {kind: storage.path(stored.key) for kind, stored in result.objects.items()}

    mp4 = ffprobe_video(files["mp4"])
    assert (mp4["codec_name"], mp4["pix_fmt"], mp4["nb_frames"]) == ("h264", "yuv420p", 10)
    assert mp4["r_frame_rate"] == Fraction(6) and (mp4["width"], mp4["height"]) == (192, 128)
    webm = ffprobe_video(files["webm"])
    assert (webm["codec_name"], webm["pix_fmt"], webm["nb_frames"]) == ("vp9", "yuv420p", 10)
    assert webm["r_frame_rate"] == Fraction(6)
    gif = ffprobe_video(files["gif"])
    assert (gif["codec_name"], gif["nb_frames"], gif["width"], gif["height"]) == ("gif", 10, 192, 128)
    assert ffprobe_codec(files["webp"]) == "webp"
    webp = animated_image_info(files["webp"].read_bytes())
    assert (webp["n_frames"], webp["size"], webp["loop"]) == (10, (192, 128), 0)
    assert decode_rgb_frames(files["webp"], 192, 128).shape[0] == 10
    with Image.open(files["thumbnail"]) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == (192, 128)
    with zipfile.ZipFile(files["frames"]) as archive:
        names = archive.namelist()
        assert len(names) == 10 and all(name.endswith(".png") for name in names)
        assert {Image.open(io.BytesIO(archive.read(name))).size for name in names} == {(192, 128)}


def test_interpolation_and_loop_shape_every_output(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage", BASE_URL, SECRET)
    service = PostProcessingService(service_settings(tmp_path), storage=storage)
    request = PostProcessRequest(
        job_id="j3", owner_id="o", fps=7, outputs=("mp4", "webm", "gif", "frames"), interpolate_fps=21, loop=True
    )
    result = service.process(request, clip(8, 64, 64))
    interpolated = (8 - 1) * 3 + 1  # 22 frames at 21 fps span the source's 8 frames at 7 fps
    looped = 2 * interpolated - 2
    for kind in ("mp4", "webm"):
        info = ffprobe_video(storage.path(result.objects[kind].key))
        assert info["nb_frames"] == looped, kind
        assert info["r_frame_rate"] == Fraction(21), kind
    assert ffprobe_video(storage.path(result.objects["gif"].key))["nb_frames"] == looped
    with zipfile.ZipFile(storage.path(result.objects["frames"].key)) as archive:
        assert len(archive.namelist()) == looped
    assert "shape_s" in result.timings


def test_with_a_cdn_outputs_are_publicly_cacheable(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "storage", BASE_URL, SECRET)
    settings = service_settings(tmp_path, cdn_base_url="https://cdn.example.com/media")
    result = PostProcessingService(settings, storage=storage).process(
        PostProcessRequest(job_id="j4", owner_id="o", fps=7, outputs=("mp4",)), clip(3, 64, 64)
    )
    assert storage.cache_control(result.objects["mp4"].key) == PUBLIC_CACHE_CONTROL


def test_presigned_s3_downloads_carry_type_and_cache_control(s3_storage: S3Storage, tmp_path: Path) -> None:
    service = PostProcessingService(service_settings(tmp_path), storage=s3_storage)
    result = service.process(PostProcessRequest(job_id="j5", owner_id="o", fps=7, outputs=ALL_OUTPUTS), clip(4, 64, 64))
    for kind, stored in result.objects.items():
        response = httpx.get(s3_storage.url(stored.key, 60), timeout=10)
        assert response.status_code == 200, kind
        assert response.headers["content-type"] == EXPECTED_NAMES[kind][1]
        assert response.headers["cache-control"] == PRIVATE_CACHE_CONTROL
        assert hashlib.sha256(response.content).hexdigest() == stored.sha256


def test_storage_refuses_bytes_that_do_not_match_their_checksum(storage: LocalStorage | S3Storage) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ValueError, match="SHA-256"):
        storage.put("o/j/video.mp4", b"video bytes", "video/mp4", sha256=wrong)
    assert not storage.exists("o/j/video.mp4")
    right = hashlib.sha256(b"video bytes").hexdigest()
    storage.put("o/j/video.mp4", b"video bytes", "video/mp4", sha256=right.upper())
    assert storage.checksum_sha256("o/j/video.mp4") == right
    storage.put("o/j/plain.bin", b"x", "application/octet-stream")
    assert storage.checksum_sha256("o/j/plain.bin") is None


def test_the_output_table_names_every_kind_the_api_accepts() -> None:
    from serving.types import OUTPUT_KINDS

    assert set(OUTPUT_FORMATS) == set(OUTPUT_KINDS) == set(ALL_OUTPUTS)


# Through the ingress and the runner --------------------------------------------------------------


@dataclass
class FramesBackend:
    """The worker's VideoBackend with the Generator replaced by `clip`, and the real
    PostProcessingService behind it, fed what LocalRayBackend feeds the PostProcessor."""

    post: PostProcessingService
    name: str = "frames"
    rendered: list[str] = field(default_factory=list)

    async def render(self, job: RenderJob, on_stage: StageCallback) -> RenderOutcome:
        self.rendered.append(job.job_id)
        await on_stage(Stage.ENCODING, 0.92)
        frames = clip(job.params.num_frames, job.params.height, job.params.width, seed=job.params.seed)
        request = PostProcessRequest.for_job(job)
        result = await asyncio.to_thread(self.post.process, request, frames)
        return RenderOutcome(objects=result.objects, gpu_seconds=0.25, device="cpu", timings=result.timings)

    async def discard(self, job: RenderJob) -> None:
        await asyncio.to_thread(self.post.discard, PostProcessRequest.for_job(job))


def ingress_settings(tmp_path: Path, database_url: str, redis_url: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path,
        "database_url": database_url,
        "redis_url": redis_url,
        "queue_name": prefix,
        "key_prefix": prefix,
        "api_keys": f"alice-{prefix}:key-alice,bob-{prefix}:key-bob",
        "storage_dir": tmp_path / "storage",
        "interpolation_method": "blend",
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def running_ingress(settings: Settings, owner: str) -> AsyncIterator[Ingress]:
    """The real ingress app (lifespan and all) behind an HTTP client holding alice's key."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://testserver", headers={"Authorization": "Bearer key-alice"}
        ) as client:
            try:
                yield Ingress(client, app.state.services, settings.resolved_storage_dir, owner)
            finally:
                await app.state.services.queue.obliterate()


async def run_queued_job(ingress: Ingress, backend: FramesBackend, job_id: str) -> None:
    """What a dispatcher does with a leased job: take it off the queue and run it to the end."""
    assert await ingress.services.queue.remove(job_id)
    runner = JobRunner(ingress.services.jobs, backend, ingress.services.redis, ingress.services.keys)
    await runner.handle(QueuedJob(job_id, ingress.owner), ConsumedJobInfo(attempt=1, max_attempts=3))


async def fetch(ingress: Ingress, url: str) -> httpx.Response:
    """Download a local-storage URL through the ingress's /files route, as a browser would."""
    parts = urlsplit(url)
    return await ingress.client.get(f"{parts.path}?{parts.query}", headers={"Authorization": ""})


@pytest.fixture
async def ingress(database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path) -> AsyncIterator[Ingress]:
    settings = ingress_settings(tmp_path, database_url, redis_url, unique_prefix)
    async with running_ingress(settings, f"alice-{unique_prefix}") as running:
        yield running


async def submit(ingress: Ingress, fields: dict[str, str], image: bytes | None = None) -> httpx.Response:
    return await ingress.client.post(
        "/api/v1/animate-image", files={"image": ("in.png", image or png_bytes(), "image/png")}, data=fields
    )


async def test_status_hands_out_every_output_with_its_checksum(ingress: Ingress) -> None:
    fields = {
        "numFrames": "6", "width": "64", "height": "64", "fps": "6", "seed": "3",
        "outputs": ",".join(ALL_OUTPUTS), "interpolateFps": "12", "loop": "true",
    }  # fmt: skip
    accepted = await submit(ingress, fields)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["jobId"]
    backend = FramesBackend(PostProcessingService(ingress.services.settings, storage=ingress.services.storage))
    await run_queued_job(ingress, backend, job_id)

    status = (await ingress.client.get(f"/api/v1/animate-image/status/{job_id}")).json()
    assert status["status"] == "completed" and status["cached"] is False and status["cachedFrom"] is None
    assert status["params"]["interpolate_fps"] == 12 and status["params"]["loop"] is True
    assert set(status["outputs"]) == set(status["checksums"]) == set(ALL_OUTPUTS)
    assert status["resultUrl"] == status["outputs"]["mp4"]
    assert status["thumbnailUrl"] == status["outputs"]["thumbnail"]
    record = await ingress.services.jobs.get(job_id)
    assert record is not None
    for kind, url in status["outputs"].items():
        name, content_type = EXPECTED_NAMES[kind]
        assert f"/files/{ingress.owner}/{job_id}/{name}?" in url
        assert record.outputs[kind]["key"] == f"{ingress.owner}/{job_id}/{name}"
        response = await fetch(ingress, url)
        assert response.status_code == 200, (kind, response.text)
        assert response.headers["content-type"].startswith(content_type)
        digest = hashlib.sha256(response.content).hexdigest()
        assert digest == status["checksums"][kind] == record.outputs[kind]["sha256"]
    mp4 = Path(ingress.storage_dir / "objects" / record.outputs["mp4"]["key"])
    assert ffprobe_video(mp4)["nb_frames"] == 2 * 11 - 2  # 6 frames 6->12 fps = 11, ping-ponged


async def test_status_urls_come_from_the_cdn_when_one_is_configured(
    database_url: str, redis_url: str, unique_prefix: str, tmp_path: Path  # noqa: F811
) -> None:
    settings = ingress_settings(
        tmp_path, database_url, redis_url, unique_prefix, cdn_base_url="https://cdn.example.com/v/"
    )
    async with running_ingress(settings, f"alice-{unique_prefix}") as ingress:
        accepted = await submit(ingress, {"numFrames": "3", "width": "64", "height": "64", "outputs": "gif"})
        job_id = accepted.json()["jobId"]
        backend = FramesBackend(PostProcessingService(settings, storage=ingress.services.storage))
        await run_queued_job(ingress, backend, job_id)
        status = (await ingress.client.get(f"/api/v1/animate-image/status/{job_id}")).json()
    base = f"https://cdn.example.com/v/{ingress.owner}/{job_id}"
    assert status["outputs"] == {"mp4": f"{base}/video.mp4", "gif": f"{base}/preview.gif"}
    assert status["resultUrl"] == f"{base}/video.mp4"
    assert ingress.services.storage.cache_control(f"{ingress.owner}/{job_id}/preview.gif") == PUBLIC_CACHE_CONTROL  # type: ignore[attr-defined]


BAD_OUTPUTS = [
    ("unknown output", {"outputs": "mp4,mov"}, "invalid_outputs", "`mov`"),
    ("several unknown", {"outputs": "avi,gif,mkv"}, "invalid_outputs", "`avi`, `mkv`"),
    ("case matters", {"outputs": "MP4"}, "invalid_outputs", "`MP4`"),
    ("interpolation not faster", {"fps": "8", "interpolateFps": "8"}, "invalid_interpolate_fps", "than `fps` (8)"),
    ("interpolation slower", {"fps": "8", "interpolateFps": "4"}, "invalid_interpolate_fps", "but is 4"),
    (
        "interpolation too long",
        {"numFrames": "16", "fps": "2", "interpolateFps": "60", "loop": "true"},
        "invalid_interpolate_fps",
        "make 900 frames; at most 384",
    ),
    ("interpolation out of range", {"interpolateFps": "240"}, "invalid_input", "interpolateFps"),
    ("loop not a boolean", {"loop": "sometimes"}, "invalid_input", "loop"),
    ("cache not a boolean", {"cache": "maybe"}, "invalid_input", "cache"),
]


@pytest.mark.parametrize("case,fields,code,detail", BAD_OUTPUTS, ids=[c[0] for c in BAD_OUTPUTS])
async def test_bad_output_options_leave_nothing(
    ingress: Ingress, case: str, fields: dict[str, str], code: str, detail: str
) -> None:
    response = await submit(ingress, fields)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["code"] == code and detail in problem["detail"]
    assert await ingress.stored_files() == []
    assert await ingress.queued() == 0
    assert await ingress.rows(ingress.owner) == 0


async def test_unknown_output_in_json_is_refused_with_the_allowed_names(ingress: Ingress) -> None:
    payload = {"imageBase64": base64.b64encode(png_bytes()).decode(), "outputs": ["mp4", "hevc"]}
    response = await ingress.client.post("/api/v1/animate-image", json=payload)
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "invalid_outputs"
    assert problem["detail"] == "Unknown output `hevc`; `outputs` may hold mp4, webm, gif, webp, thumbnail, frames."
    assert await ingress.stored_files() == [] and await ingress.queued() == 0


async def test_outputs_default_to_video_and_thumbnail_and_always_include_the_video(ingress: Ingress) -> None:
    default = (await submit(ingress, {})).json()["jobId"]
    only_gif = (await submit(ingress, {"outputs": "gif,gif"})).json()["jobId"]
    records = {job_id: await ingress.services.jobs.get(job_id) for job_id in (default, only_gif)}
    assert records[default] is not None and records[default].params["outputs"] == ["mp4", "thumbnail"]  # type: ignore[union-attr]
    assert records[only_gif] is not None and records[only_gif].params["outputs"] == ["mp4", "gif"]  # type: ignore[union-attr]
    status = (await ingress.client.get(f"/api/v1/animate-image/status/{default}")).json()
    assert status["status"] == JobStatus.QUEUED.value and status["outputs"] == {} and status["checksums"] == {}
