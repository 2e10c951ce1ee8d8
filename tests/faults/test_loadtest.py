"""scripts/loadtest.py against a real ingress process and a dispatcher process: every accepted
job completes once the load stops (accepted == completed), and the report adds up."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.faults.conftest import API_KEY, FaultStack

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "loadtest.py"


def _load_script() -> ModuleType:
    # scripts/ is not a package: load the file the way `python scripts/loadtest.py` runs it.
    spec = importlib.util.spec_from_file_location("loadtest", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loadtest"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


loadtest = _load_script()
LoadResult, percentile, run_load, summarize = loadtest.LoadResult, loadtest.percentile, loadtest.run_load, loadtest.summarize


def test_percentile_and_summary() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    result = LoadResult(submit_latencies_s=[0.1, 0.2], accepted=["a", "b"])
    result.answers.update({"202": 2, "429": 1})
    timings = {"queue_wait_s": 1.0, "inference_s": 10.0, "total_s": 11.2}
    result.final = {"a": {"status": "completed", "timings": timings}, "b": {"status": "completed", "timings": timings}}
    summary = summarize(result)
    assert (summary["accepted"], summary["completed"], summary["unfinished"], summary["errors"]) == (2, 2, 0, 0)
    assert summary["overhead_mean_s"] == pytest.approx(0.2)
    assert summary["overhead_share_of_pipeline"] == pytest.approx(0.02)


@pytest.mark.slow
async def test_load_then_drain(stack: FaultStack, tmp_path: Path) -> None:
    ingress = stack.start_ingress(tmp_path / "ingress")
    stack.start_worker(step_s=0.02, steps=2, dispatcher_concurrency=2)
    result = await run_load(ingress.base_url, API_KEY, rate=5, duration_s=2, drain_timeout_s=30, poll_s=0.1)
    summary = summarize(result)
    assert summary["errors"] == 0 and summary["accepted"] >= 8
    assert summary["completed"] == summary["accepted"] and summary["unfinished"] == 0
    assert 0 < summary["submit_latency_p50_s"] <= summary["submit_latency_p99_s"]


def test_spike_profile_concentrates_arrivals_in_the_middle() -> None:
    offsets = loadtest.arrival_offsets("spike", rate=1.0, duration_s=100, spike_factor=10)
    spike = [t for t in offsets if 40 <= t < 60]
    assert len(spike) == pytest.approx(200, abs=2) and len(offsets) - len(spike) == pytest.approx(80, abs=2)
    assert offsets == sorted(offsets) and offsets[-1] < 100
    assert loadtest.arrival_offsets("constant", rate=2.0, duration_s=3) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    with pytest.raises(ValueError, match="unknown profile"):
        loadtest.arrival_offsets("burst", 1.0, 10)


def test_read_sample_takes_the_generator_and_the_whole_queue() -> None:
    text = (
        'svd_queue_depth_jobs{priority="high"} 2.0\nsvd_queue_depth_jobs{priority="normal"} 5.0\n'
        'svd_serve_replicas_wanted{deployment="Generator"} 3.0\nsvd_serve_replicas_wanted{deployment="Dispatcher"} 1.0\n'
        'svd_serve_replicas_running{deployment="Generator"} 2.0\n'
    )
    sample = loadtest.read_sample(text, 12.345)
    assert (sample.t, sample.queue_depth, sample.wanted, sample.running) == (12.35, 7.0, 3.0, 2.0)


@pytest.mark.slow
async def test_spike_load_samples_the_queue_and_draws_it(stack: FaultStack, tmp_path: Path) -> None:
    ingress = stack.start_ingress(tmp_path / "ingress")
    stack.start_worker(step_s=0.05, steps=4, dispatcher_concurrency=1)
    result = await run_load(ingress.base_url, API_KEY, rate=1, duration_s=5, drain_timeout_s=60, poll_s=0.1,
                            profile="spike", spike_factor=8, metrics_url=ingress.base_url, sample_s=0.2)
    summary = summarize(result)
    assert summary["errors"] == 0 and summary["completed"] == summary["accepted"] >= 10
    depths = [s.queue_depth for s in result.samples]
    assert depths and all(d is not None for d in depths)
    assert max(d for d in depths if d is not None) >= 1  # the spike queued jobs behind the one worker slot
    chart = tmp_path / "spike.png"
    loadtest.draw(result.samples, result.arrivals, chart, "spike")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
