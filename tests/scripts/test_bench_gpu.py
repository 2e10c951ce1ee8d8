"""scripts/bench_gpu.py: end to end on the CPU (tiny model), its lease plan, and the pieces that keep
its rows fair (restored global settings, the same timing split for every row, extrapolation).

The CPU run is kept small (2 frames, 3 steps, one timed run of 2 steps per row, no warm-up run, the
tiny model on one thread: about 20 s of CPU) so that it does not depend on the machine's speed or
load; its numbers are not checked against each other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from serving import cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_gpu.py"
LEASE = ROOT / "scripts" / "gpu_lease.sh"
ROW_FIELDS = {
    "name", "kind", "preset", "batch_size", "memory_mode", "sage_attention", "s_per_video", "s_per_video_runs",
    "extrapolated", "videos_per_gpu_hour", "peak_memory_gib", "startup_s", "compile_s", "graphs_compiled",
    "speedup_vs_reference", "pre_s", "step_s", "shallow_step_s", "decode_s", "denoise_s", "unet_tflops", "unet_mfu",
    "latent_rel_error", "frames_psnr_db", "unet_step_rel_error", "fidelity_steps", "finite", "notes",
}


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load()


@pytest.mark.slow
def test_cpu_run_compares_diffusers_and_every_preset(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    args = ["--out", str(out), "--frames", "2", "--steps", "3", "--measure-steps", "2", "--runs", "1", "--warmup", "0"]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "No CUDA: the tiny random model on the CPU" in printed
    assert "* extrapolated to 3 steps from timed runs of 2 steps" in printed
    report = json.loads(out.read_text())

    assert (report["schema"], report["cuda"], report["tiny_model"], report["half_dtype"]) == (2, False, True, "float32")
    assert report["device"]["name"] == "cpu" and report["matmul_peak_tflops"] > 0
    [model] = report["models"]
    assert (model["model"], model["width"], model["height"], model["num_frames"], model["steps"]) == (
        "tiny-random", 64, 64, 2, 3
    )
    assert (model["measured_steps"], model["extrapolated"], model["skipped"]) == (2, True, [])
    assert model["unet_tflop_per_guided_step"] > 0 and model["vae_decode_tflop"] > 0

    runs = {row["name"]: row for row in model["runs"]}
    assert list(runs) == ["diffusers-fp32-anchor", "diffusers-float32", "reference", "quality", "quality x2", "fast",
                          "reference+sage", "fast+sage", "reference+low_vram"]
    for row in runs.values():
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert "error" not in row and row["finite"] is True
        assert not any(key.startswith("_") for key in row)  # working tensors stay out of the JSON
        assert len(row["s_per_video_runs"]) == 1 and row["s_per_video"] > 0 and row["extrapolated"] is True
        assert row["step_s"] > 0 and row["decode_s"] > 0 and row["fidelity_steps"] == 2
        assert row["peak_memory_gib"] is None  # no CUDA
        assert row["latent_rel_error"] is not None and 0 <= row["latent_rel_error"] < 1
    assert runs["diffusers-float32"]["speedup_vs_reference"] == 1.0
    assert runs["quality x2"]["batch_size"] == 2 and runs["reference+low_vram"]["memory_mode"] == "low_vram"
    # The larger batch runs on the batch of one's engine: no second pipeline, no second compile.
    assert runs["quality x2"]["notes"][-1] == "the previous row's engine and compiled graphs"
    # The anchor is diffusers in float32, and our reference preset in float32 is diffusers exactly.
    assert runs["diffusers-fp32-anchor"]["latent_rel_error"] == 0.0
    assert runs["reference"]["latent_rel_error"] == 0.0 and runs["reference"]["frames_psnr_db"] is None
    assert runs["fast"]["latent_rel_error"] > runs["quality"]["latent_rel_error"]  # DeepCache's cost shows
    assert runs["fast"]["shallow_step_s"] is not None and runs["quality"]["shallow_step_s"] is None
    assert any("deepcache" in note for note in runs["fast"]["notes"])
    assert any("8-bit SageAttention skipped, needs CUDA" in note for note in runs["fast+sage"]["notes"])
    assert "fast+sage: attention: 8-bit SageAttention skipped, needs CUDA" in printed  # notes are printed

    breakdown = model["breakdown"]
    shares = breakdown["flops_per_row_step"]["shares"]
    assert {"attention L0", "feed-forward", "resnets and convs"} <= set(shares)
    assert sum(shares.values()) == pytest.approx(1, abs=1e-3)
    assert sum(breakdown["time_guided_step_s"]["shares"].values()) == pytest.approx(1, abs=1e-3)
    assert 0 < breakdown["flops_shallow_fraction"] < 1
    ceilings = {c["name"]: c for c in breakdown["ceilings"]}
    assert ceilings["fp8 linears"]["unet_speedup"] == 1.0  # the tiny model has no FP8-eligible Linear
    # Time shares on a busy CPU are noise: only that every bound is there, for the UNet and the video.
    assert all(c["unet_speedup"] > 0 and c["video_speedup"] > 0 for c in ceilings.values())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_lease_command_dry_runs_its_plan_on_the_cpu() -> None:
    # The one command of a GPU lease, as a person runs it here: its install line, its tests and the
    # benchmark's plan for SVD-XT at 576x1024 (FLOPs counted on the meta device), nothing run.
    done = subprocess.run(["bash", str(LEASE), "--dry-run"], cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=240, check=True)
    printed = done.stdout
    assert "--target /tmp/site .carry/*.whl" in printed
    assert "-m pytest -m gpu -p no:asyncio" in printed and "tests/pipelines tests/models" in printed
    assert "bench_gpu.py --target cuda --models svd-xt --budget-s 420" in printed
    assert "# plan on CUDA: svd-xt (random full-size) 1024x576, 25 frames, 25 steps; each timed run denoises 6 steps " \
           "(whole video extrapolated)" in printed
    assert "159.9 TFLOP per guided step" in printed
    rows = {line.split()[0]: line for line in printed.splitlines()
            if line.startswith(("diffusers", "reference", "quality", "fast"))}
    assert {"diffusers-fp32-anchor", "diffusers-float16", "reference", "quality", "fast", "fast+sage"} <= set(rows)
    assert all(rows[name].endswith(" run") for name in ("diffusers-fp32-anchor", "diffusers-float16", "reference"))
    planned = float(printed.split("# planned: ")[1].split(" s")[0])
    assert 0 < planned <= 420


def test_every_row_starts_from_the_same_global_settings(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    state = bench.GlobalState.capture()
    tuning, benchmark = inductor_config.coordinate_descent_tuning, torch.backends.cudnn.benchmark
    with state.isolated():
        # What the `fast` preset flips, process-wide.
        inductor_config.coordinate_descent_tuning = not tuning
        torch.backends.cudnn.benchmark = not benchmark
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = "/elsewhere"
    assert inductor_config.coordinate_descent_tuning == tuning
    assert torch.backends.cudnn.benchmark == benchmark
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_a_whole_video_is_extrapolated_from_its_measured_steps(bench: ModuleType) -> None:
    # Device synchronized after each step: marks at 1.0 (step 0 done), then steps 1..5.
    run = bench._split(0.0, [1.0, 1.2, 1.4, 2.4, 2.6, 2.8], 3.3)
    assert run.steps_s == pytest.approx([0.2, 0.2, 1.0, 0.2, 0.2])
    # DeepCache every 3: steps 3 and 6 are full (1.0 s), the others shallow (0.2 s).
    assert bench._step_times(run, 3) == pytest.approx((1.0, 0.2))
    # 25 steps: 9 full, 16 shallow; set-up: 1.0 to the end of step 0, less a full step; decode 0.5.
    assert bench._video_time(run, 25, 3) == pytest.approx(9 * 1.0 + 16 * 0.2 + 0.5)
    plain = bench._split(0.0, [1.0, 1.5, 2.0], 2.25)
    assert bench._video_time(plain, 25, 0) == pytest.approx(0.5 + 25 * 0.5 + 0.25)


def test_svd_serve_bench_hands_every_argument_to_the_script(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["bench", "--runs", "1", "--no-chart"])
    assert args.func is cli.cmd_bench and args.bench_args == ["--runs", "1", "--no-chart"]
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--help"])
    assert info.value.code == 0
    assert "--budget-s" in capsys.readouterr().out
