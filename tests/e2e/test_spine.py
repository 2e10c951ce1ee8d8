"""An image goes in over HTTP, a video comes out: real Redis, PostgreSQL, Ray, ffmpeg and S3."""

from __future__ import annotations

import io
from fractions import Fraction
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from tests.e2e.conftest import Stack
from tests.media_checks import ffprobe_video, mp4_top_level_boxes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parents[2] / "serving" / "assets" / "sample.png"


def wait_status(client: httpx.Client, job_id: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(f"/api/v1/animate-image/status/{job_id}").json()
        if until(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the expected state; last: {status}")


def submit(client: httpx.Client, **fields: str) -> str:
    with SAMPLE.open("rb") as fh:
        response = client.post("/api/v1/animate-image", files={"image": ("sample.png", fh, "image/png")}, data=fields)
    assert response.status_code == 202, response.text
    return str(response.json()["jobId"])


def test_png_in_video_out(e2e_stack: Stack, tmp_path: Path) -> None:
    with e2e_stack.client() as client:
        job_id = submit(client, numFrames="8", fps="8", seed="3", width="128", height="64")
        status = wait_status(client, job_id, lambda s: s["status"] in ("completed", "error", "canceled"))
        assert status["status"] == "completed", status
        assert status["progress"] == 1.0 and status["attempts"] == 1
        assert status["timings"]["inference_s"] > 0 and status["gpuSeconds"] > 0
        assert set(status["outputs"]) == {"mp4", "thumbnail"}

    # Download as any client would: the presigned URL needs no credentials.
    video = httpx.get(status["resultUrl"], timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "out.mp4"
    path.write_bytes(video.content)
    probe = ffprobe_video(path)
    assert probe["codec_name"] == "h264" and probe["pix_fmt"] == "yuv420p"
    assert int(probe["nb_frames"]) == 8
    assert (probe["width"], probe["height"]) == (128, 64)
    assert probe["r_frame_rate"] == Fraction(8, 1)
    boxes = mp4_top_level_boxes(video.content)
    assert boxes.index("moov") < boxes.index("mdat")

    thumb = httpx.get(status["thumbnailUrl"], timeout=30)
    assert thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"


def test_cancel_queued_and_running_jobs(e2e_stack: Stack) -> None:
    rdb = redis.Redis.from_url(e2e_stack.env["REDIS_URL"])
    prefix = e2e_stack.env["SVD_SERVE_KEY_PREFIX"]
    with e2e_stack.client() as client:
        # A slow job (many steps, largest size) keeps the single dispatcher slot busy...
        running = submit(client, numFrames="16", numInferenceSteps="50", width="256", height="256")
        # ...so this one waits in the queue behind it.
        queued = submit(client, numFrames="4", numInferenceSteps="2")
        wait_status(client, running, lambda s: s["status"] == "processing" and s["progress"] > 0)
        assert client.get(f"/api/v1/animate-image/status/{queued}").json()["queuePosition"] == 0

        canceled_queued = client.delete(f"/api/v1/animate-image/{queued}")
        assert canceled_queued.status_code == 200 and canceled_queued.json()["status"] == "canceled"
        canceled_running = client.delete(f"/api/v1/animate-image/{running}")
        assert canceled_running.status_code == 200 and canceled_running.json()["status"] == "canceled"

        # The worker is free again once the running job stopped at its next step: a new job completes.
        after = submit(client, numFrames="4", numInferenceSteps="2")
        done = wait_status(client, after, lambda s: s["status"] in ("completed", "error"))
        assert done["status"] == "completed", done

        stopped = client.get(f"/api/v1/animate-image/status/{running}").json()
        assert stopped["status"] == "canceled" and stopped["resultUrl"] is None
        progress = rdb.hgetall(f"{prefix}:job:{running}:progress")
        assert int(progress[b"step"]) < int(progress[b"steps"]) == 50  # it stopped early

        never_ran = client.get(f"/api/v1/animate-image/status/{queued}").json()
        assert never_ran["status"] == "canceled" and never_ran["attempts"] == 0


def test_cli_submit_waits_and_downloads(e2e_stack: Stack, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "cli.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "submit", str(SAMPLE), "--url", e2e_stack.base_url,
         "--api-key", e2e_stack.api_key, "--num-frames", "4", "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_id, video, thumbnail = result.stdout.splitlines()  # data on stdout; progress went to stderr
    assert (video, thumbnail) == (str(out), str(out.with_suffix(".jpg"))) and job_id in result.stderr
    assert ffprobe_video(out)["codec_name"] == "h264"
    with Image.open(out.with_suffix(".jpg")) as thumb:
        assert thumb.format == "JPEG"
