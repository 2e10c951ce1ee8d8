"""Load test for a running svd-serve (issue #5): an open-model generator (submissions at a fixed
rate, whatever the answers' latency), for a fixed time, then a drain.

    python scripts/loadtest.py --base-url http://127.0.0.1:8000 --api-key KEY --rate 2 --duration 60

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


@dataclass
class LoadResult:
    """Everything the run observed."""

    submit_latencies_s: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> last status body


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
    fields: dict[str, str] | None = None, poll_s: float = 0.5,
) -> LoadResult:
    """Submit at `rate` per second for `duration_s` (open model: one task per arrival), then wait
    up to `drain_timeout_s` for every accepted job to finish."""
    result = LoadResult()
    image = sample_png()
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits) as client:
        tasks: list[asyncio.Task[None]] = []
        started = time.monotonic()
        count = 0
        while time.monotonic() - started < duration_s:
            due = started + count / rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())  # the arrival schedule
            tasks.append(asyncio.create_task(_submit(client, image, dict(fields or {}), result)))
            count += 1
        if tasks:
            await asyncio.gather(*tasks)
        await _drain(client, result, drain_timeout_s, poll_s)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rate", type=float, default=1.0, help="submissions per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of submissions")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                        help="a form field for every submission, e.g. model=svd-xt")
    args = parser.parse_args(argv)
    fields = dict(item.split("=", 1) for item in args.field)
    result = asyncio.run(run_load(args.base_url, args.api_key, args.rate, args.duration, args.drain_timeout, fields))
    summary = summarize(result)
    print(json.dumps(summary, indent=2))
    return 0 if summary["unfinished"] == 0 and summary["errors"] == 0 and summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
