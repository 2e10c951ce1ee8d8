"""A month of video jobs, self-hosted SVD versus Runway: what each costs and where they break even.

    python scripts/cost_model.py                                   # 1,000 jobs, an H100 on spot, scale to zero
    python scripts/cost_model.py --jobs 5000 --gpu h100 --pricing on_demand --min-gpus 1
    python scripts/cost_model.py --json                            # the same, machine-readable

Self-hosted, a month costs:
- the platform, whatever the volume (`--platform-usd`: the on-demand Ray head, ingress pods,
  Redis, PostgreSQL, object storage);
- the GPU floor: `--min-gpus` GPUs up all month (730 h each, busy or not; 0 = scale to zero);
- GPU time for the jobs: `--seconds-per-video` GPU-seconds each (measured: read from a CUDA
  benchmark in scripts/results/ when one is there), over `--utilization` for the gaps between
  batches;
- every burst of traffic above the floor: each GPU it adds is paid while it cold-starts
  (`--cold-start-s`: node boot, image pull, weights, compile) and for its idle tail after the
  burst (`--idle-tail-s`: Serve's downscale delay + Ray's idle timeout + the node autoscaler's).
Runway: every video is `--runway-seconds` long at `--credits-per-second` credits, each credit
`--credit-price` USD.

The break-even is the smallest monthly job count at which self-hosting is cheaper; there is none
when a self-hosted video costs more at the margin than a Runway one. GPU prices come from the
table below (each with its source and the date it was read) unless `--gpu-hour` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.settings import Settings  # noqa: E402

HOURS_PER_MONTH = 730.0
DAYS_PER_MONTH = HOURS_PER_MONTH / 24
VOLUMES = (100, 500, 1_000, 2_000, 5_000, 10_000, 50_000)
RESULTS = Path(__file__).resolve().parent / "results"
# Ray's idleTimeoutSeconds (k8s/base/rayservice.yaml) and Karpenter's consolidateAfter
# (k8s/karpenter/nodepool-gpu-spot.yaml): how long an idle GPU node lingers once Serve let go of it.
RAY_IDLE_TIMEOUT_S = 300.0
NODE_CONSOLIDATE_S = 300.0
DEFAULT_SECONDS_PER_VIDEO = 45.0  # an assumption (SVD-XT, 25 frames, 25 steps, one H100) until measured


@dataclass(frozen=True)
class Price:
    usd_per_gpu_hour: float
    source: str
    read_on: str


# One GPU for an hour in AWS us-east-1, USD: the whole instance (GPU + host) over its GPU count.
# Spot prices move by zone and over time (the cheaper end of the zones is shown): read them again
# before deciding. Sources, dates and Google Cloud's prices: docs/cost.md.
_AWS_LIST = "AWS price list (SkyPilot catalog snapshot; on-demand cross-checked against data-receipts, retrieved 2026-11-09)"
PRICES: dict[str, dict[str, Price]] = {
    "h100": {
        "on_demand": Price(6.88, f"p5.48xlarge $55.04/h / 8, {_AWS_LIST}", "2026-12-02"),
        "spot": Price(3.22, f"p5.48xlarge spot, us-east-1 zones $2.20-3.22 per GPU, {_AWS_LIST}", "2026-12-02"),
    },
    "a100": {
        "on_demand": Price(3.43, f"p4de.24xlarge $27.45/h / 8, {_AWS_LIST}", "2026-12-02"),
        "spot": Price(1.25, f"p4de.24xlarge spot, us-east-1 zones $1.08-1.25 per GPU, {_AWS_LIST}", "2026-12-02"),
    },
    "l4": {
        "on_demand": Price(0.80, f"g6.xlarge $0.8048/h, {_AWS_LIST}", "2026-12-02"),
        "spot": Price(0.40, f"g6.xlarge spot, us-east-1 zones $0.35-0.40, {_AWS_LIST}", "2026-12-02"),
    },
}


@dataclass(frozen=True)
class Assumptions:
    """Everything the month's costs depend on."""

    seconds_per_video: float  # measured GPU-seconds of one video on a replica
    seconds_source: str  # where that number comes from
    utilization: float  # busy share of the GPU time the jobs themselves need
    gpu_hour_usd: float
    price_source: str
    min_gpus: int  # always-on floor (0: scale to zero)
    bursts_per_day: float  # times a day traffic rises above the floor
    gpus_per_burst: int  # GPUs each burst adds
    cold_start_s: float  # paid per added GPU before it serves
    idle_tail_s: float  # paid per added GPU after its burst
    platform_usd: float  # fixed per month
    runway_seconds: int
    credits_per_second: float
    credit_usd: float

    @property
    def runway_per_video(self) -> float:
        return self.runway_seconds * self.credits_per_second * self.credit_usd

    @property
    def gpu_hours_per_video(self) -> float:
        return self.seconds_per_video / self.utilization / 3600.0

    @property
    def self_hosted_marginal(self) -> float:
        """USD of one more video on a GPU that is already up."""
        return self.gpu_hours_per_video * self.gpu_hour_usd

    @property
    def burst_gpu_hours(self) -> float:
        """GPU-hours a month paid for cold starts and idle tails of the bursts."""
        per_gpu = (self.cold_start_s + self.idle_tail_s) / 3600.0
        return self.bursts_per_day * DAYS_PER_MONTH * self.gpus_per_burst * per_gpu


@dataclass(frozen=True)
class MonthCost:
    jobs: int
    self_hosted_usd: float
    runway_usd: float
    gpu_hours: float  # GPU-hours paid self-hosted
    busy_gpu_hours: float  # of which the jobs themselves

    @property
    def cheaper(self) -> str:
        return "self-hosted" if self.self_hosted_usd < self.runway_usd else "runway"


def self_hosted_usd(jobs: float, a: Assumptions) -> tuple[float, float, float]:
    """(USD, paid GPU-hours, busy GPU-hours) for `jobs` videos in a month."""
    busy = jobs * a.gpu_hours_per_video
    bursts = a.burst_gpu_hours if jobs > 0 else 0.0
    paid = max(a.min_gpus * HOURS_PER_MONTH, busy + bursts)
    return a.platform_usd + paid * a.gpu_hour_usd, paid, busy


def month(jobs: int, a: Assumptions) -> MonthCost:
    """One month of `jobs` videos on each side."""
    usd, paid, busy = self_hosted_usd(jobs, a)
    return MonthCost(jobs, round(usd, 2), round(jobs * a.runway_per_video, 2), round(paid, 1), round(busy, 1))


def break_even_jobs(a: Assumptions) -> int | None:
    """The smallest monthly job count at which self-hosting is cheaper; None when Runway is
    cheaper at every volume (a self-hosted video costs more at the margin)."""
    if a.self_hosted_marginal >= a.runway_per_video:
        return None

    def cheaper(jobs: int) -> bool:
        return self_hosted_usd(jobs, a)[0] < jobs * a.runway_per_video

    high = 1
    while not cheaper(high):  # the gap grows linearly past the fixed costs, so this ends
        high *= 2
    low = high // 2
    while high - low > 1:  # the first volume where self-hosting wins
        mid = (low + high) // 2
        low, high = (low, mid) if cheaper(mid) else (mid, high)
    return high


def measured_seconds(model: str, preset: str, results: Path = RESULTS) -> tuple[float, str] | None:
    """GPU-seconds per video from the best CUDA benchmark row of `model` and `preset` in
    scripts/results/ (CPU runs of the tiny model say nothing about GPUs and are skipped)."""
    best: tuple[float, str] | None = None
    for path in sorted(results.glob("bench-*.json")):
        try:
            report: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not report.get("cuda"):
            continue
        card = (report.get("device") or {}).get("name", "unknown GPU")
        for entry in report.get("models", []):
            if entry.get("model") != model:
                continue
            for row in entry.get("runs", []):
                per_hour = row.get("videos_per_gpu_hour")
                if row.get("preset") == preset and per_hour:
                    seconds = 3600.0 / float(per_hour)
                    if best is None or seconds < best[0]:
                        best = (seconds, f"{path.name}: {card}, {preset}, batch {row.get('batch_size')}")
    return best


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Assumptions]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000, help="videos in the simulated month")
    parser.add_argument("--model", default="svd-xt", help="model whose measured GPU-seconds to read")
    parser.add_argument("--preset", default="fast", help="engine preset whose measured GPU-seconds to read")
    parser.add_argument("--seconds-per-video", type=float, default=None,
                        help="GPU-seconds per video (default: scripts/results/, else an assumed 45)")
    parser.add_argument("--utilization", type=float, default=0.85, help="busy share of the GPU time jobs need")
    parser.add_argument("--gpu", choices=sorted(PRICES), default="h100",
                        help="price table row; the default GPU-seconds assume an H100")
    parser.add_argument("--pricing", choices=("on_demand", "spot"), default="spot")
    parser.add_argument("--gpu-hour", type=float, default=None, help="USD per GPU-hour (overrides the table)")
    parser.add_argument("--min-gpus", type=int, default=0, help="GPUs always on (0: scale to zero)")
    parser.add_argument("--bursts-per-day", type=float, default=4.0, help="times a day traffic rises above the floor")
    parser.add_argument("--gpus-per-burst", type=int, default=1)
    parser.add_argument("--cold-start-s", type=float, default=420.0,
                        help="paid seconds before a new GPU serves (boot, image pull, weights, compile)")
    parser.add_argument("--idle-tail-s", type=float,
                        default=defaults.autoscale_downscale_delay_s + RAY_IDLE_TIMEOUT_S + NODE_CONSOLIDATE_S,
                        help="paid seconds a GPU lingers after its burst (Serve + Ray + node autoscaler delays)")
    parser.add_argument("--platform-usd", type=float, default=250.0,
                        help="fixed monthly cost: Ray head, ingress, Redis, PostgreSQL, storage")
    parser.add_argument("--runway-seconds", type=int, choices=(5, 10), default=5)
    parser.add_argument("--credits-per-second", type=float, default=defaults.runway_credits_per_second)
    parser.add_argument("--credit-price", type=float, default=defaults.runway_credit_price_usd)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where benchmark JSON files are read")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.utilization <= 1:
        parser.error(f"--utilization must be in (0, 1] but is {args.utilization}")
    negatives = [name for name in ("jobs", "min_gpus", "bursts_per_day", "gpus_per_burst", "cold_start_s",
                                   "idle_tail_s", "platform_usd") if getattr(args, name) < 0]
    if negatives or (args.seconds_per_video is not None and args.seconds_per_video <= 0):
        parser.error(f"must not be negative: {', '.join(negatives) or 'seconds-per-video'}")
    if args.seconds_per_video is not None:
        seconds, seconds_source = args.seconds_per_video, "--seconds-per-video"
    else:
        measured = measured_seconds(args.model, args.preset, args.results)
        seconds, seconds_source = measured or (
            DEFAULT_SECONDS_PER_VIDEO, f"assumed: no CUDA benchmark of {args.model}/{args.preset} in {args.results.name}/")
    table_price = PRICES[args.gpu][args.pricing]
    hour, price_source = ((args.gpu_hour, "--gpu-hour") if args.gpu_hour is not None
                          else (table_price.usd_per_gpu_hour, f"{table_price.source}, read {table_price.read_on}"))
    return args, Assumptions(
        seconds_per_video=seconds,
        seconds_source=seconds_source,
        utilization=args.utilization,
        gpu_hour_usd=hour,
        price_source=price_source,
        min_gpus=args.min_gpus,
        bursts_per_day=args.bursts_per_day,
        gpus_per_burst=args.gpus_per_burst,
        cold_start_s=args.cold_start_s,
        idle_tail_s=args.idle_tail_s,
        platform_usd=args.platform_usd,
        runway_seconds=args.runway_seconds,
        credits_per_second=args.credits_per_second,
        credit_usd=args.credit_price,
    )


def main(argv: list[str] | None = None) -> int:
    args, a = parse_args(argv)
    simulated = month(args.jobs, a)
    even = break_even_jobs(a)
    table = [month(n, a) for n in sorted({*VOLUMES, args.jobs})]
    if args.json:
        print(json.dumps({
            "assumptions": asdict(a),
            "month": {**asdict(simulated), "cheaper": simulated.cheaper},
            "break_even_jobs_per_month": even,
            "by_volume": [{**asdict(m), "cheaper": m.cheaper} for m in table],
        }, indent=2))  # fmt: skip
        return 0
    print(f"Self-hosted: {a.seconds_per_video:.1f} GPU-s per video ({a.seconds_source}) at {a.utilization:.0%} "
          f"utilization; ${a.gpu_hour_usd:.2f}/GPU-hour ({a.price_source})")
    print(f"  floor {a.min_gpus} GPU(s); {a.bursts_per_day:g} burst(s)/day x {a.gpus_per_burst} GPU, each paid "
          f"{a.cold_start_s:.0f} s cold start + {a.idle_tail_s:.0f} s idle tail = {a.burst_gpu_hours:.1f} GPU-h/month; "
          f"platform ${a.platform_usd:.0f}/month")
    print(f"Runway: {a.runway_seconds} s videos, {a.runway_seconds * a.credits_per_second:g} credits "
          f"= ${a.runway_per_video:.2f} per video; self-hosted at the margin ${a.self_hosted_marginal:.4f} per video")
    print()
    print(f"{'jobs/month':>10}  {'self-hosted $':>14}  {'runway $':>10}  {'GPU-h paid':>10}  {'GPU-h busy':>10}  cheaper")
    for m in table:
        marker = "  <- simulated month" if m.jobs == args.jobs else ""
        row = f"{m.jobs:>10}  {m.self_hosted_usd:>14.2f}  {m.runway_usd:>10.2f}  {m.gpu_hours:>10.1f}  {m.busy_gpu_hours:>10.1f}"
        print(f"{row}  {m.cheaper}{marker}")
    print()
    if even is None:
        print("Break-even: none; Runway is cheaper at every volume with these numbers.")
    else:
        print(f"Break-even: {even:,} jobs/month; from there on self-hosting is cheaper.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
