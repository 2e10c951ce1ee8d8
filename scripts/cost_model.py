"""A month of video jobs, self-hosted SVD versus Runway: what each costs and where they break even.

    python scripts/cost_model.py                                  # 1,000 jobs, the default prices
    python scripts/cost_model.py --jobs 5000 --seconds-per-video 38 --pricing spot --always-on-gpus 1
    python scripts/cost_model.py --json                           # the same, machine-readable

Self-hosted: the pool keeps `--always-on-gpus` GPUs up all month (730 h each, paid whether busy
or not) and adds GPU time beyond that as jobs need it (autoscaling). A video takes
`--seconds-per-video` GPU-seconds as measured on the replica (scripts/bench_gpu.py reports it),
divided by `--utilization` for idle time between jobs, scale-up and warm-up. Runway: every video
is `--runway-seconds` long at `--credits-per-second` credits, at `--credit-price` USD a credit.

The break-even is the monthly job count above which self-hosting is cheaper: the always-on cost
divided by Runway's price per video, provided a self-hosted video costs less at the margin than a
Runway one (otherwise Runway is cheaper at every volume). Prices default to svd-serve's settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.settings import Settings  # noqa: E402

HOURS_PER_MONTH = 730.0
VOLUMES = (100, 500, 1_000, 2_000, 5_000, 10_000, 50_000)


@dataclass(frozen=True)
class Assumptions:
    """Everything the month's costs depend on."""

    seconds_per_video: float  # measured GPU-seconds of one video on the replica
    utilization: float  # busy share of the GPU time paid beyond the always-on floor
    gpu_hour_usd: float
    always_on_gpus: int
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
        """USD of one more video once the always-on GPUs are saturated."""
        return self.gpu_hours_per_video * self.gpu_hour_usd


@dataclass(frozen=True)
class MonthCost:
    jobs: int
    self_hosted_usd: float
    runway_usd: float
    gpu_hours: float  # GPU-hours paid self-hosted

    @property
    def cheaper(self) -> str:
        return "self-hosted" if self.self_hosted_usd < self.runway_usd else "runway"


def month(jobs: int, a: Assumptions) -> MonthCost:
    """One month of `jobs` videos on each side."""
    needed = jobs * a.gpu_hours_per_video
    paid = max(a.always_on_gpus * HOURS_PER_MONTH, needed)
    return MonthCost(jobs, round(paid * a.gpu_hour_usd, 2), round(jobs * a.runway_per_video, 2), round(paid, 1))


def break_even_jobs(a: Assumptions) -> float | None:
    """Jobs per month above which self-hosting is cheaper; None when Runway always is."""
    if a.self_hosted_marginal >= a.runway_per_video:
        return None
    return a.always_on_gpus * HOURS_PER_MONTH * a.gpu_hour_usd / a.runway_per_video


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Assumptions]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000, help="videos in the simulated month")
    parser.add_argument("--seconds-per-video", type=float, default=45.0,
                        help="measured GPU-seconds per video (SVD-XT, 25 frames, 25 steps on an H100: ~45)")
    parser.add_argument("--utilization", type=float, default=0.7)
    parser.add_argument("--pricing", choices=("on_demand", "spot"), default=defaults.gpu_pricing)
    parser.add_argument("--gpu-hour", type=float, default=None, help="USD per GPU-hour (default: the --pricing tier)")
    parser.add_argument("--always-on-gpus", type=int, default=1)
    parser.add_argument("--runway-seconds", type=int, choices=(5, 10), default=5)
    parser.add_argument("--credits-per-second", type=float, default=defaults.runway_credits_per_second)
    parser.add_argument("--credit-price", type=float, default=defaults.runway_credit_price_usd)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not 0 < args.utilization <= 1:
        parser.error(f"--utilization must be in (0, 1] but is {args.utilization}")
    if args.seconds_per_video <= 0 or args.jobs < 0 or args.always_on_gpus < 0:
        parser.error("--seconds-per-video must be positive, --jobs and --always-on-gpus not negative")
    hour = args.gpu_hour
    if hour is None:
        hour = defaults.gpu_hour_spot_price_usd if args.pricing == "spot" else defaults.gpu_hour_price_usd
    return args, Assumptions(
        seconds_per_video=args.seconds_per_video,
        utilization=args.utilization,
        gpu_hour_usd=hour,
        always_on_gpus=args.always_on_gpus,
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
    print(f"Self-hosted: {a.seconds_per_video:g} GPU-s per video at {a.utilization:.0%} utilization, "
          f"${a.gpu_hour_usd:.2f}/GPU-hour, {a.always_on_gpus} GPU(s) always on")
    print(f"Runway: {a.runway_seconds} s videos, {a.runway_seconds * a.credits_per_second:g} credits "
          f"= ${a.runway_per_video:.2f} per video; self-hosted at the margin ${a.self_hosted_marginal:.4f} per video")
    print()
    print(f"{'jobs/month':>10}  {'self-hosted $':>14}  {'runway $':>10}  {'GPU-hours':>9}  cheaper")
    for m in table:
        marker = "  <- simulated month" if m.jobs == args.jobs else ""
        row = f"{m.jobs:>10}  {m.self_hosted_usd:>14.2f}  {m.runway_usd:>10.2f}  {m.gpu_hours:>9.1f}"
        print(f"{row}  {m.cheaper}{marker}")
    print()
    if even is None:
        print("Break-even: none; Runway is cheaper at every volume with these numbers.")
    else:
        print(f"Break-even: {even:,.0f} jobs/month; above it self-hosting is cheaper.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
