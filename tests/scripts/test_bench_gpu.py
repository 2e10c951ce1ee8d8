"""scripts/bench_gpu.py end to end on the CPU (tiny model): the JSON it writes and its chart."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from serving import cli

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.py"
ROW_FIELDS = {
    "name", "kind", "preset", "batch_size", "memory_mode", "s_per_video", "s_per_video_runs", "videos_per_gpu_hour",
    "peak_memory_gib", "startup_s", "compile_s", "speedup_vs_reference", "denoise_s", "unet_tflops", "unet_mfu",
    "latent_rel_error", "unet_step_rel_error", "psnr_db", "notes",
}


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_run_compares_diffusers_and_every_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert _load().main(["--out", str(out), "--runs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA: the tiny random model on the CPU" in printed
    report = json.loads(out.read_text())

    assert (report["cuda"], report["tiny_model"], report["half_dtype"]) == (False, True, "bfloat16")
    assert "No CUDA" in report["note"] and report["device"]["name"] == "cpu"
    assert report["matmul_peak_tflops"] > 0
    [model] = report["models"]
    assert (model["model"], model["width"], model["height"], model["num_frames"], model["steps"]) == (
        "tiny-random", 64, 64, 8, 4
    )
    assert model["unet_tflop_per_guided_step"] > 0 and model["vae_decode_tflop"] > 0

    runs = {row["name"]: row for row in model["runs"]}
    assert list(runs) == ["diffusers-bfloat16", "reference", "quality", "quality x2", "fast", "reference+low_vram"]
    for row in runs.values():
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert "error" not in row
        assert len(row["s_per_video_runs"]) == 2 and row["s_per_video"] > 0
        assert row["videos_per_gpu_hour"] == pytest.approx(3600 / row["s_per_video"], rel=1e-2)
        assert row["peak_memory_gib"] is None and row["psnr_db"] is None  # no CUDA, random weights
        assert row["unet_tflops"] > 0 and 0 <= row["latent_rel_error"] < 1
    assert runs["diffusers-bfloat16"]["speedup_vs_reference"] == 1.0
    assert runs["quality x2"]["batch_size"] == 2 and runs["reference+low_vram"]["memory_mode"] == "low_vram"
    # The reference preset is diffusers' numerics: the same error against fp32; DeepCache costs more.
    assert runs["reference"]["latent_rel_error"] == pytest.approx(runs["diffusers-bfloat16"]["latent_rel_error"],
                                                                  rel=1e-3)
    assert runs["fast"]["latent_rel_error"] > runs["quality"]["latent_rel_error"]
    assert any("deepcache" in note for note in runs["fast"]["notes"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_svd_serve_bench_hands_every_argument_to_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["bench", "--runs", "1", "--no-chart"])
    assert args.func is cli.cmd_bench and args.bench_args == ["--runs", "1", "--no-chart"]
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--help"])
    assert info.value.code == 0
    assert "--scaling-preset" in capsys.readouterr().out
