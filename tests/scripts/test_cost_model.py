"""scripts/cost_model.py run as a program: its month, its table and its break-even."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cost_model.py"
# A fixed world: $2.50/GPU-hour, 45 GPU-s per video at 100 %, Runway at $0.25 per 5 s video.
BASE = ("--gpu-hour", "2.5", "--seconds-per-video", "45", "--utilization", "1", "--credit-price", "0.01",
        "--credits-per-second", "5")


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cost_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def test_an_always_on_floor_and_its_break_even() -> None:
    result = run(*BASE, "--jobs", "1000", "--min-gpus", "1", "--platform-usd", "0", "--bursts-per-day", "0")
    assert result.returncode == 0, result.stderr
    simulated = next(line for line in result.stdout.splitlines() if "simulated month" in line).split()
    # 1,000 jobs: one always-on GPU for 730 h at $2.50 against 1,000 x 25 credits x $0.01.
    assert simulated[:4] == ["1000", "1825.00", "250.00", "730.0"] and simulated[5] == "runway"
    # The floor covers 730 h / (45 s) = 58,400 videos; 1825 / 0.25 = 7,300 jobs pay for it.
    assert "Break-even: 7,301 jobs/month" in result.stdout


def test_scale_to_zero_pays_for_bursts_and_the_platform_so_break_even_is_never_zero() -> None:
    cost_model = load()
    _, a = cost_model.parse_args([*BASE, "--min-gpus", "0", "--platform-usd", "100", "--bursts-per-day", "2",
                                  "--cold-start-s", "300", "--idle-tail-s", "1200"])
    # 2 bursts a day x 30.4 days x 1500 s paid = 25.3 GPU-h; with the platform: $163.4 a month.
    assert a.burst_gpu_hours == pytest.approx(2 * 730 / 24 * 1500 / 3600)
    usd, paid, busy = cost_model.self_hosted_usd(1, a)
    assert busy == pytest.approx(45 / 3600) and usd == pytest.approx(100 + paid * 2.5)
    even = cost_model.break_even_jobs(a)
    # The first volume where the fixed costs are earned back at $0.25 - $0.03125 per video.
    fixed = 100 + a.burst_gpu_hours * 2.5
    assert even == int(fixed / (0.25 - 45 / 3600 * 2.5)) + 1
    assert cost_model.self_hosted_usd(even, a)[0] < even * 0.25 <= cost_model.self_hosted_usd(even - 1, a)[0] + 0.25


def test_json_and_the_model_agree() -> None:
    result = run(*BASE, "--jobs", "20000", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["month"]["jobs"] == 20000 and data["month"]["cheaper"] == "self-hosted"
    cost_model = load()
    a = cost_model.Assumptions(**data["assumptions"])
    assert cost_model.month(20000, a).self_hosted_usd == data["month"]["self_hosted_usd"]
    assert data["break_even_jobs_per_month"] == cost_model.break_even_jobs(a)


def test_no_break_even_when_a_gpu_video_costs_more_than_runway() -> None:
    result = run(*BASE, "--seconds-per-video", "2000")
    assert result.returncode == 0 and "Break-even: none" in result.stdout
    refused = run("--utilization", "0")
    assert refused.returncode == 2 and "--utilization" in refused.stderr


def test_prices_come_from_the_table_with_their_source(tmp_path: Path) -> None:
    cost_model = load()
    for gpu, tiers in cost_model.PRICES.items():
        assert tiers["spot"].usd_per_gpu_hour < tiers["on_demand"].usd_per_gpu_hour, gpu
        for price in tiers.values():
            assert price.source and price.read_on
    _, a = cost_model.parse_args(["--gpu", "h100", "--pricing", "on_demand", "--results", str(tmp_path)])
    assert a.gpu_hour_usd == cost_model.PRICES["h100"]["on_demand"].usd_per_gpu_hour
    assert a.seconds_source.startswith("assumed")


def test_measured_seconds_come_from_a_cuda_benchmark(tmp_path: Path) -> None:
    cost_model = load()
    def report(cuda: bool, per_hour: float) -> dict[str, object]:
        return {"cuda": cuda, "device": {"name": "NVIDIA H100 80GB HBM3"}, "models": [
            {"model": "svd-xt", "runs": [{"preset": "fast", "batch_size": 1, "videos_per_gpu_hour": per_hour},
                                         {"preset": "fast", "batch_size": 2, "videos_per_gpu_hour": 2 * per_hour},
                                         {"preset": "reference", "batch_size": 1, "videos_per_gpu_hour": 9999}]}]}
    (tmp_path / "bench-cpu.json").write_text(json.dumps(report(False, 3600)))  # the tiny model on CPU: ignored
    (tmp_path / "bench-h100.json").write_text(json.dumps(report(True, 60)))
    seconds, source = cost_model.measured_seconds("svd-xt", "fast", tmp_path)
    assert seconds == pytest.approx(30.0) and "bench-h100.json" in source and "batch 2" in source
    _, a = cost_model.parse_args(["--results", str(tmp_path)])
    assert a.seconds_per_video == pytest.approx(30.0)
