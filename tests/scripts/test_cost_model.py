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


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cost_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False)


def test_prints_a_month_and_the_break_even() -> None:
    result = run("--jobs", "1000", "--gpu-hour", "2.5", "--always-on-gpus", "1", "--credit-price", "0.01",
                 "--credits-per-second", "5", "--seconds-per-video", "45", "--utilization", "0.7")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    simulated = next(line for line in lines if "simulated month" in line).split()
    # 1,000 jobs: one always-on GPU for 730 h at $2.50 against 1,000 x 25 credits x $0.01.
    assert simulated[:4] == ["1000", "1825.00", "250.00", "730.0"] and simulated[4] == "runway"
    assert "Break-even: 7,300 jobs/month" in result.stdout  # 1825 / 0.25


def test_json_and_the_model_agree() -> None:
    result = run("--jobs", "20000", "--pricing", "spot", "--gpu-hour", "1.0", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["break_even_jobs_per_month"] == pytest.approx(730 * 1.0 / 0.25)
    assert data["month"]["jobs"] == 20000 and data["month"]["cheaper"] == "self-hosted"
    cost_model = load()
    a = cost_model.Assumptions(**data["assumptions"])
    assert cost_model.month(20000, a).self_hosted_usd == data["month"]["self_hosted_usd"]
    # Past the always-on capacity the pool pays for the GPU time the jobs need.
    busy = cost_model.month(100_000, a)
    assert busy.gpu_hours == pytest.approx(100_000 * 45 / 0.7 / 3600, abs=0.1)


def test_no_break_even_when_a_gpu_video_costs_more_than_runway() -> None:
    result = run("--seconds-per-video", "2000", "--gpu-hour", "2.5")
    assert result.returncode == 0 and "Break-even: none" in result.stdout
    refused = run("--utilization", "0")
    assert refused.returncode == 2 and "--utilization" in refused.stderr
