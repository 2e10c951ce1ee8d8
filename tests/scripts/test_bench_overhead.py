"""scripts/bench_overhead.py run as a program on a small clip: the stages it times, with Ray."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_overhead.py"


def test_clip_is_a_moving_photo_like_picture() -> None:
    spec = importlib.util.spec_from_file_location("bench_overhead_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clip = module.camera_move(5, 96, 64)
    assert clip.shape == (5, 64, 96, 3) and clip.dtype == np.uint8
    assert clip[0].std() > 25  # detail, not a flat picture
    assert np.abs(clip[0].astype(int) - clip[-1].astype(int)).mean() > 5  # the camera moves


@pytest.mark.slow
def test_times_postprocessing_and_the_ray_transfer(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--frames", "6", "--width", "128", "--height", "64", "--runs", "2",
         "--json", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(out.read_text())
    assert numbers["shape"] == {"frames": 6, "width": 128, "height": 64, "fps": 7}
    assert numbers["encode_s"] > 0 and numbers["ray_transfer_s"] > 0 and numbers["video_mb"] > 0
    assert numbers["postprocess_s"] >= numbers["encode_s"]
    assert numbers["outside_pipeline_s"] == pytest.approx(numbers["postprocess_s"] + numbers["ray_transfer_s"])
    assert numbers["pipeline_s_for_5_percent"] == pytest.approx(numbers["outside_pipeline_s"] * 20, abs=0.01)
    assert "outside_pipeline_s" in result.stdout
