"""Load test for a running svd-serve (issue #5): an open-model generator (submissions on a fixed
schedule, whatever the answers' latency), for a fixed time, then a drain.

    python scripts/loadtest.py --base-url http://127.0.0.1:8000 --api-key KEY --rate 2 --duration 60
    python scripts/loadtest.py --api-key KEY --profile spike --rate 0.2 --spike-factor 10 --duration 600 \
        --metrics-url http://svd-serve-exporter:9100 --timeline timeline.json --chart spike.png

Profiles: `constant` (`--rate` per second throughout) and `spike` (the base rate, then
`--spike-factor` times it for the middle fifth of the run, then the base rate again): the shape
that makes the Generator pool scale out and back. With `--timeline`/`--chart`, a sampler reads
the metrics endpoint every `--sample-s` (the exporter on Kubernetes, the ingress on one machine)
and records queue depth and Generator replicas wanted/running over time, drawn in one PNG.

Reports submit latency p50/p99, answers by status (429/503 are backpressure, not errors), accepted
vs completed (they must be equal once drained), and per job: time in the queue, the pipeline's
time (`inference_s`) and the service's own time outside both (dispatch, database, post-processing,
upload = total - queue wait - inference), which must stay under 5% of the pipeline's time for an
SVD-XT job on a GPU. A benchmark, not a test: its results go in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = {"completed", "error", "canceled"}
SPIKE_START, SPIKE_END = 0.4, 0.6  # the spike's place in the run, as fractions of --duration


def arrival_offsets(profile: str, rate: float, duration_s: float, spike_factor: float = 10.0) -> list[float]:
    """Seconds after the start at which submissions are due."""
    if profile == "constant":
        return [i / rate for i in range(int(duration_s * rate))]
    if profile != "spike":
        raise ValueError(f"unknown profile {profile!r}: constant or spike")
    offsets: list[float] = []
    t = 0.0
    while t < duration_s:
        offsets.append(t)
        in_spike = SPIKE_START * duration_s <= t < SPIKE_END * duration_s
        t += 1.0 / (rate * spike_factor if in_spike else rate)
    return offsets


@dataclass
class Sample:
    """One reading of the metrics endpoint."""

    t: float  # seconds since the load started
    queue_depth: float | None
    wanted: float | None  # Generator replicas Serve wants
    running: float | None


def read_sample(text: str, t: float) -> Sample:
    """Queue depth (all priorities) and the Generator's replicas from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    depth = wanted = running = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "svd_queue_depth_jobs":
                depth = (depth or 0.0) + s.value
            elif s.name == "svd_serve_replicas_wanted" and s.labels.get("deployment") == "Generator":
                wanted = s.value
            elif s.name == "svd_serve_replicas_running" and s.labels.get("deployment") == "Generator":
                running = s.value
    return Sample(round(t, 2), depth, wanted, running)


async def sample_metrics(client: httpx.AsyncClient, url: str, every_s: float, started: float,
                         samples: list[Sample], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            answer = await client.get(f"{url.rstrip('/')}/metrics")
            samples.append(read_sample(answer.text, time.monotonic() - started))
        except httpx.HTTPError:
            pass  # a missed sample is a gap in the chart, not a failure of the load test
        try:
            await asyncio.wait_for(stop.wait(), timeout=every_s)  # the sampling period
        except TimeoutError:
            pass


def draw(samples: list[Sample], arrivals: list[float], out: Any, title: str) -> None:
    """Queue depth and replicas wanted/running over time, with arrivals per 10 s, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, depth_axis = plt.subplots(figsize=(10, 5))
    ts = [s.t for s in samples]
    depth_axis.plot(ts, [s.queue_depth for s in samples], color="tab:blue", label="queue depth (jobs waiting)")
    if arrivals:
        buckets = Counter(int(a // 10) * 10 for a in arrivals)
        depth_axis.bar(list(buckets), list(buckets.values()), width=9, alpha=0.2, color="tab:gray",
                       align="edge", label="submissions per 10 s")
    depth_axis.set_xlabel("seconds since the load started")
    depth_axis.set_ylabel("jobs")
    replicas_axis = depth_axis.twinx()
    replicas_axis.step(ts, [s.wanted for s in samples], where="post", color="tab:orange", linewidth=3,
                       linestyle="--", label="Generators wanted")
    replicas_axis.step(ts, [s.running for s in samples], where="post", color="tab:green", label="Generators running")
    replicas_axis.set_ylabel("Generator replicas")
    lines = depth_axis.get_legend_handles_labels()
    more = replicas_axis.get_legend_handles_labels()
    depth_axis.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right")
    depth_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


@dataclass
class LoadResult:
    """Everything the run observed."""

    submit_latencies_s: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> last status body
    arrivals: list[float] = field(default_factory=list)  # seconds since the start, per submission
    samples: list[Sample] = field(default_factory=list)  # the metrics timeline, when sampled


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(result: LoadResult) -> dict[str, Any]:
    completed = [body for body in result.final.values() if body.get("status") == "completed"]
    queue_wait = [float(b["timings"].get("queue_wait_s", 0.0)) for b in completed]
    pipeline = [float(b["timings"].get("inference_s", 0.0)) for b in completed]
    overhead = [
        max(0.0, float(b["timings"].get("total_s", 0.0)) - float(b["timings"].get("queue_wait_s", 0.0))
            - float(b["timings"].get("inference_s", 0.0)))
        for b in completed
    ]
    pipeline_total = sum(pipeline)
    return {
        "submitted": sum(result.answers.values()),
        "answers": dict(result.answers),
        "errors": sum(n for code, n in result.answers.items() if code not in ("202", "200", "429", "503")),
        "accepted": len(result.accepted),
        "completed": len(completed),
        "failed": sum(1 for b in result.final.values() if b.get("status") == "error"),
        "unfinished": len(result.accepted) - sum(1 for b in result.final.values() if b.get("status") in TERMINAL),
        "submit_latency_p50_s": round(percentile(result.submit_latencies_s, 0.5), 4),
        "submit_latency_p99_s": round(percentile(result.submit_latencies_s, 0.99), 4),
        "queue_wait_mean_s": round(statistics.fmean(queue_wait), 4) if queue_wait else 0.0,
        "pipeline_mean_s": round(statistics.fmean(pipeline), 4) if pipeline else 0.0,
        "overhead_mean_s": round(statistics.fmean(overhead), 4) if overhead else 0.0,
        "overhead_share_of_pipeline": round(sum(overhead) / pipeline_total, 4) if pipeline_total else None,
    }


def sample_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (120, 60, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def _submit(client: httpx.AsyncClient, image: bytes, fields: dict[str, str], result: LoadResult) -> None:
    started = time.perf_counter()
    try:
        answer = await client.post("/api/v1/animate-image", files={"image": ("in.png", image, "image/png")},
                                   data=fields)
    except httpx.HTTPError as exc:
        result.answers[type(exc).__name__] += 1
        return
    result.submit_latencies_s.append(time.perf_counter() - started)
    result.answers[str(answer.status_code)] += 1
    if answer.status_code == 202:
        result.accepted.append(answer.json()["jobId"])


async def _drain(client: httpx.AsyncClient, result: LoadResult, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = set(result.accepted)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            answer = await client.get(f"/api/v1/animate-image/status/{job_id}")
            if answer.status_code == 200:
                result.final[job_id] = answer.json()
                if answer.json()["status"] in TERMINAL:
                    pending.discard(job_id)
        if pending:
            await asyncio.sleep(poll_s)  # polling interval of the drain, bounded by the deadline


async def run_load(
    base_url: str, api_key: str, rate: float, duration_s: float, drain_timeout_s: float,
    fields: dict[str, str] | None = None, poll_s: float = 0.5, *, profile: str = "constant",
    spike_factor: float = 10.0, metrics_url: str | None = None, sample_s: float = 2.0, tail_s: float = 0.0,
) -> LoadResult:
    """Submit on the `profile`'s schedule for `duration_s` (open model: one task per arrival),
    then wait up to `drain_timeout_s` for every accepted job to finish; with `metrics_url`, sample
    the queue and the Generator replicas throughout (drain included) and `tail_s` longer (the
    pool scaling back down)."""
    result = LoadResult()
    image = sample_png()
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits) as client:
        started = time.monotonic()
        stop = asyncio.Event()
        sampler = None
        if metrics_url is not None:
            sampler = asyncio.create_task(sample_metrics(client, metrics_url, sample_s, started, result.samples, stop))
        tasks: list[asyncio.Task[None]] = []
        for offset in arrival_offsets(profile, rate, duration_s, spike_factor):
            due = started + offset
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())  # the arrival schedule
            result.arrivals.append(round(time.monotonic() - started, 3))
            tasks.append(asyncio.create_task(_submit(client, image, dict(fields or {}), result)))
        if tasks:
            await asyncio.gather(*tasks)
        await _drain(client, result, drain_timeout_s, poll_s)
        if sampler is not None and tail_s > 0:
            await asyncio.sleep(tail_s)  # keep sampling: the idle tail, the pool scaling down
        stop.set()
        if sampler is not None:
            await sampler
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rate", type=float, default=1.0, help="submissions per second (the spike's base rate)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of submissions")
    parser.add_argument("--profile", choices=("constant", "spike"), default="constant")
    parser.add_argument("--spike-factor", type=float, default=10.0, help="the spike's rate over the base rate")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                        help="a form field for every submission, e.g. model=svd-xt")
    parser.add_argument("--metrics-url", help="where /metrics is (the exporter; default --base-url)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="seconds between metrics samples")
    parser.add_argument("--tail-s", type=float, default=0.0, help="seconds to keep sampling after the drain")
    parser.add_argument("--timeline", help="write the sampled timeline (JSON) here")
    parser.add_argument("--chart", help="draw queue depth and Generators wanted/running (PNG) here")
    args = parser.parse_args(argv)
    fields = dict(item.split("=", 1) for item in args.field)
    sampling = args.timeline or args.chart
    result = asyncio.run(run_load(
        args.base_url, args.api_key, args.rate, args.duration, args.drain_timeout, fields, profile=args.profile,
        spike_factor=args.spike_factor, metrics_url=(args.metrics_url or args.base_url) if sampling else None,
        sample_s=args.sample_s, tail_s=args.tail_s,
    ))
    summary = summarize(result)
    print(json.dumps(summary, indent=2))
    if args.timeline:
        with open(args.timeline, "w") as out:
            json.dump({"summary": summary, "arrivals": result.arrivals,
                       "samples": [vars(s) for s in result.samples]}, out, indent=1)
    if args.chart:
        draw(result.samples, result.arrivals, args.chart,
             f"{args.profile} load: {len(result.arrivals)} submissions over {args.duration:g} s")
    return 0 if summary["unfinished"] == 0 and summary["errors"] == 0 and summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
