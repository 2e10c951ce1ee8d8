"""`make demo` runs `svd-serve demo`: private Redis, SQLite, local storage, Ray, ingress, all
started by the CLI. This runs that command as a newcomer would and checks the video it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from PIL import Image

from tests.media_checks import ffprobe_video, mp4_top_level_boxes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_demo_writes_a_playable_mp4_and_thumbnail(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVD_SERVE_") and k != "REDIS_URL"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "serving.cli", "demo", "--out", "demo-output"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    video, thumb = tmp_path / "demo-output" / "demo.mp4", tmp_path / "demo-output" / "demo.jpg"
    assert f"video: {video}" in result.stdout and f"thumbnail: {thumb}" in result.stdout
    assert "tiny-random has random weights" in result.stdout

    probe = ffprobe_video(video)
    assert probe["codec_name"] == "h264" and probe["pix_fmt"] == "yuv420p"
    assert int(probe["nb_frames"]) == 8 and probe["r_frame_rate"] == Fraction(7, 1)  # tiny-random defaults
    boxes = mp4_top_level_boxes(video.read_bytes())
    assert boxes.index("moov") < boxes.index("mdat")
    with Image.open(thumb) as image:
        assert image.format == "JPEG"
    # State lives under ./.svd-serve by default: the SQLite file, storage and the private Redis.
    state = tmp_path / ".svd-serve"
    assert (state / "svd-serve.db").is_file() and (state / "redis").is_dir() and (state / "storage").is_dir()
