"""After a job on the real stack, /metrics shows every operations signal and the job's log lines
are JSON sharing its job_id (issue #8)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.local_stack import free_port
from tests.e2e.conftest import Stack
from tests.e2e.test_spine import submit, wait_status

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]
STAGES = ("queue_wait", "inference", "postprocessing", "upload", "end_to_end")
# Ray prefixes what a replica prints with "(ServeReplica:app:Deployment pid=N) " (maybe coloured).
RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)*\([^)]*\)(?:\x1b\[[0-9;]*m)*\s*")


def scrape(base_url: str) -> Series:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def pick(series: Series, name: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, lbl), v in series.items() if n == name and want <= lbl]


def one(series: Series, name: str, **labels: str) -> float:
    found = pick(series, name, **labels)
    assert found, f"{name}{labels} is missing"
    return sum(found)


def scrape_until(base_url: str, ready: Callable[[Series], bool], timeout_s: float = 60) -> Series:
    """Worker metrics land in Redis just after the job's row does: poll for them, bounded."""
    deadline = time.monotonic() + timeout_s
    series = scrape(base_url)
    while not ready(series):
        if time.monotonic() > deadline:
            raise AssertionError("metrics never showed the job")
        time.sleep(0.2)
        series = scrape(base_url)
    return series


def job_log_lines(log_path: Path, job_id: str) -> list[dict[str, Any]]:
    entries = []
    for raw in log_path.read_text(errors="replace").splitlines():
        if job_id not in raw:
            continue
        line = RAY_PREFIX.sub("", raw)
        entries.append(json.loads(line))  # every line that names the job is a JSON object
    return entries


def test_metrics_and_logs_after_a_job(e2e_stack: Stack) -> None:
    before = scrape(e2e_stack.base_url)

    def delta(series: Series, name: str, **labels: str) -> float:
        return sum(pick(series, name, **labels)) - sum(pick(before, name, **labels))

    with e2e_stack.client() as client:
        job_id = submit(client, numFrames="4", numInferenceSteps="4", seed="11", priority="high")
        status = wait_status(client, job_id, lambda s: s["status"] in ("completed", "error", "canceled"))
    assert status["status"] == "completed", status

    def job_seen(s: Series) -> bool:
        # the cost is the last thing the Dispatcher writes; replica counts come every few seconds
        return delta(s, "svd_job_cost_usd_count") >= 1 and sum(
            pick(s, "svd_serve_replicas_running", deployment="Generator")) >= 1

    series = scrape_until(e2e_stack.base_url, job_seen)
    model = "tiny-random"
    assert delta(series, "svd_submissions_total", status_code="202", model=model) == 1
    for priority in ("high", "normal", "low"):
        assert one(series, "svd_queue_depth_jobs", priority=priority) >= 0
        assert 0 <= one(series, "svd_queue_oldest_job_age_seconds", priority=priority) < 3600
    for stage in STAGES:
        assert delta(series, "svd_job_stage_duration_seconds_count", stage=stage, model=model) == 1, stage
        assert delta(series, "svd_job_stage_duration_seconds_sum", stage=stage, model=model) >= 0, stage
    stage_sum = {s: delta(series, "svd_job_stage_duration_seconds_sum", stage=s, model=model) for s in STAGES}
    assert 0 < stage_sum["inference"] < stage_sum["end_to_end"] < 120
    assert stage_sum["end_to_end"] >= stage_sum["queue_wait"]
    assert delta(series, "svd_jobs_finished_total", status="completed", model=model) == 1

    # 4 denoising steps = 3 timed intervals, on whatever device the Generator has
    assert delta(series, "svd_denoising_step_duration_seconds_count", model=model) == 3
    assert 0 < delta(series, "svd_denoising_step_duration_seconds_sum", model=model) < 60
    devices = {dict(lbl)["device"] for (n, lbl) in series if n == "svd_gpu_memory_used_bytes"}
    assert devices, "no svd_gpu_memory_used_bytes series"
    for device in devices:
        assert one(series, "svd_gpu_memory_used_bytes", device=device) >= 0
        assert 0 <= one(series, "svd_gpu_utilization_ratio", device=device) <= 1
    assert delta(series, "svd_generator_batch_size_count", model=model) == 1
    assert delta(series, "svd_generator_batch_size_sum", model=model) == 1

    for deployment in ("Generator", "Dispatcher", "PostProcessor"):
        assert one(series, "svd_serve_replicas_wanted", deployment=deployment) >= 1
        assert one(series, "svd_serve_replicas_running", deployment=deployment) >= 1
    assert delta(series, "svd_provider_routing_decisions_total", provider="local") == 1
    for outcome in ("succeeded", "retry", "failed", "disabled"):
        assert one(series, "svd_webhook_delivery_attempts_total", outcome=outcome) >= 0
    assert one(series, "svd_webhook_delivery_failures_total", reason="exhausted") >= 0

    cost = delta(series, "svd_job_cost_usd_sum", provider="local", model=model)
    assert 0 < cost < 1  # a second or so of GPU time at a few dollars an hour
    assert delta(series, "svd_owner_cost_usd_total", owner="alice", provider="local") == pytest.approx(cost)
    assert delta(series, "svd_owner_gpu_seconds_total", owner="alice") == pytest.approx(status["gpuSeconds"], rel=1e-3)
    assert one(series, "svd_metrics_redis_up") == 1

    entries = job_log_lines(e2e_stack.worker_log, job_id)
    events = {e["event"] for e in entries}
    assert {"job_started", "generation_done", "job_completed"} <= events, events
    # a line about one job names it in `job_id`; one about a batch lists it in `job_ids`
    strays = [e for e in entries if e.get("job_id") != job_id and job_id not in e.get("job_ids", [])]
    assert not strays, strays
    assert {e.get("owner_id") for e in entries if e["event"] in ("job_started", "job_completed")} == {"alice"}


DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_metrics() -> dict[str, str]:
    """{metric: target} from the table in docs/metrics.md, the list the README points operators to."""
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| \w+ \|[^|]*\| ([a-z ()]+) \|", DOCS.read_text(), re.MULTILINE)
    assert rows, "docs/metrics.md has no metric table"
    return {name: target.split()[0] for name, target in rows}


def exposed(series: Series, name: str) -> bool:
    """A counter is exposed as `_total`, a histogram as `_bucket`/`_sum`/`_count`."""
    return any(n == name or (n.startswith(name + "_") and n[len(name):] in ("_bucket", "_sum", "_count"))
               for n, _ in series)


def test_every_documented_metric_is_scraped_from_its_target(e2e_stack: Stack, tmp_path: Path) -> None:
    """Each svd_* metric docs/metrics.md lists is on a real scrape of its target (the ingress for
    its own, `svd-serve exporter` for the Redis-held ones), and no svd_* metric goes undocumented.
    (The Ray one is checked on a real cluster's head by tests/cluster.)"""
    documented = documented_metrics()
    with e2e_stack.client() as client:  # a job of its own: the worker metrics exist once one ran
        job_id = submit(client, numFrames="4", numInferenceSteps="2")
        status = wait_status(client, job_id, lambda s: s["status"] in ("completed", "error", "canceled"))
    assert status["status"] == "completed", status
    port = free_port()
    with (tmp_path / "exporter.log").open("wb") as log:
        exporter = subprocess.Popen([sys.executable, "-m", "serving.cli", "exporter", "--port", str(port)],
                                    env=e2e_stack.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        exporter_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{exporter_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert exporter.poll() is None and time.monotonic() < deadline, (tmp_path / "exporter.log").read_text()
            time.sleep(0.2)  # polling the exporter's start, bounded by the deadline
        # the Dispatcher refreshes the Serve gauges every few seconds, and its first report may
        # predate the application's RUNNING: wait until they are there and say RUNNING
        def complete(series: Series) -> bool:  # the job's cost, and the Dispatcher's periodic gauges
            return (exposed(series, "svd_job_cost_usd") and exposed(series, "svd_serve_application_running")
                    and sum(pick(series, "svd_serve_application_running")) == 1)

        scraped = {"exporter": scrape_until(exporter_url, complete, timeout_s=120),
                   "ingress": scrape(e2e_stack.base_url)}
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)
    for name, target in documented.items():
        if target in scraped:
            assert exposed(scraped[target], name), f"{name} is documented on the {target} but not scraped there"
    shared = {n for n, _ in scraped["exporter"]}
    assert one(scraped["exporter"], "svd_serve_application_running") == 1
    assert one(scraped["exporter"], "svd_provider_breaker_open", provider="local") == 0
    # prometheus-client adds a `_created` timestamp beside each counter; it documents itself
    every = {n for series in scraped.values() for n, _ in series if n.startswith("svd_") and not n.endswith("_created")}
    undocumented = {n for n in every if not any(n == d or n.startswith(d + "_") for d in documented)}
    assert not undocumented, undocumented
    assert shared  # the exporter serves the Redis-held families itself
