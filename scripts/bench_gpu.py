"""Benchmark: diffusers' StableVideoDiffusionPipeline against our engine presets, with no thumb on the scale.

    python scripts/bench_gpu.py                          # on a CUDA node: SVD-XT and SVD, full size
    python scripts/bench_gpu.py --models svd-xt --presets reference,quality,fast --runs 5
    python scripts/bench_gpu.py --target cuda --budget-s 420 --dry-run   # the lease plan, anywhere
    svd-serve bench --weights /models/svd-xt             # real weights

For each model (SVD-XT at 576x1024, 25 frames, 25 steps; SVD at 14 frames) it runs, on identical
weights: diffusers' pipeline in float32 (the fidelity anchor, TF32 off), diffusers' pipeline in
half precision (the reference every speed-up is measured against, `decode_chunk_size=8`), each
preset (`NAME+sage` adds the opt-in 8-bit attention), a batch-size scaling run and a low-VRAM run.

Every row is measured the same way: the device synchronized after every denoising step (diffusers'
`callback_on_step_end`, our `on_progress`), the time before the first step (image encoding,
set-up), each UNet step and the time after the last (VAE decode) taken apart; untimed warm-up runs
first (where torch.compile compiles); global settings (cuDNN, TF32, inductor and dynamo config,
the environment) restored and dynamo reset before every row, so no row depends on the one before;
the latents and frames of every row checked for NaN/inf. Fidelity: relative error of the final
latents, PSNR of the frames and relative error of one UNet step against the float32 anchor.

`--budget-s S` fits the run into S seconds: each timed run denoises `--measure-steps` steps (6 by
default there) and the whole video is extrapolated from the measured steps (full and DeepCache-
shallow steps apart) and the measured encode and decode; rows that would not fit are skipped, in
priority order, with the reason. The JSON and the chart say which figures are extrapolated.
Fidelity is then that of the short video, against the anchor's short video.

Also printed and written: where a UNet step's FLOPs (meta device) and time (one profiled eager
step) go, by component (attention per level, attention projections, feed-forward, resnets and
convs, the rest) and the ceiling each optimization could reach from that.

Without CUDA it runs on the tiny random model on the CPU, in float32 throughout and without
torch.compile, and says so. Those numbers exercise the benchmark; they say nothing about GPUs.
Needs only torch, diffusers, transformers and this repository's `models` and `pipelines`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if importlib.util.find_spec("pipelines") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers
import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline
from PIL import Image

from models.full_size import empty_full_size_models, full_size_random_pipeline
from models.registry import get_spec
from models.specs import ModelSpec
from models.tiny_random import tiny_random_pipeline
from pipelines import BatchItem, EngineOptions, VideoParams, preset
from pipelines.breakdown import Breakdown, ceilings, component_tags, count_flops, time_step
from pipelines.denoisers import DeepCacheDenoiser
from pipelines.optimize import compiled_graph_count
from pipelines.svd import VideoPipeline

GIB = 1024**3
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 2
ANCHOR = "diffusers-fp32-anchor"  # diffusers in float32, TF32 off: what every row's fidelity is measured against
# Assumed rates for the plan before anything is measured (one H100/H200; replaced by measurements
# as the run goes): sustained UNet TFLOP/s per precision, and compile seconds per compiled preset.
ASSUMED_TFLOPS = {"cuda": {"float32": 40.0, "half": 300.0}, "cpu": {"float32": 0.05, "half": 0.02}}
ASSUMED_COMPILE_S = {"cuda": {"quality": 150.0, "fast": 225.0}, "cpu": {"quality": 0.0, "fast": 0.0}}
ASSUMED_SETUP_S = {"cuda": 40.0, "cpu": 5.0}  # imports, CUDA context, fp32 master weights, FLOP count
ASSUMED_ROW_SETUP_S = {"cuda": 5.0, "cpu": 1.0}  # cloning weights, preparing the engine


# -- what is benchmarked --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Workload:
    """What one model is benchmarked on: the whole video (`steps`) and the measured run (`measure_steps`)."""

    model: str
    spec: ModelSpec
    weights: str  # "random full-size", "tiny-random", or the directory of real weights
    width: int
    height: int
    num_frames: int
    steps: int
    measure_steps: int
    decode_chunk: int

    @property
    def extrapolated(self) -> bool:
        return self.measure_steps < self.steps


@dataclasses.dataclass(frozen=True)
class Env:
    """The machine: where to run and in which half precision."""

    device: torch.device
    cuda: bool
    half: torch.dtype  # float16 on CUDA; float32 stands in on the CPU (its bfloat16 kernels crawl)
    half_name: str

    @property
    def kind(self) -> str:
        return "cuda" if self.cuda else "cpu"


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One configuration to measure."""

    name: str
    kind: str  # "diffusers" or "preset"
    dtype: str = "half"  # diffusers rows: "float32" (the anchor) or "half"
    preset: str | None = None
    sage: bool = False
    batch_size: int = 1
    memory_mode: str = "normal"
    reuse_previous: bool = False  # a batch-scaling row: the row before's pipeline and compiled graphs

    @property
    def is_anchor(self) -> bool:
        return self.kind == "diffusers" and self.dtype == "float32"


@dataclasses.dataclass
class Run:
    """One timed run: wall time, and its parts (device synchronized after every step)."""

    total_s: float
    first_s: float  # until step 0 ended: image encoding and set-up, then step 0 (see `_pre_s`)
    steps_s: list[float]  # step i's time, i >= 1
    post_s: float  # after the last step: the VAE decode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="svd-xt,svd", help="comma-separated (CUDA only; the CPU runs tiny-random)")
    parser.add_argument("--presets", default="reference,reference+sage,quality,fast,fast+sage",
                        help="engine presets to compare; NAME+sage adds the opt-in 8-bit attention")
    parser.add_argument("--target", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available; cuda: refuse to run without it (plans for it in --dry-run)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per row (default 3 GPU, 1 CPU or budget)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (compiles)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of a whole video (default: the model's)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: the model's)")
    parser.add_argument("--measure-steps", type=int, default=None,
                        help="steps each timed run denoises; fewer than --steps extrapolates the whole video "
                             "(default: all, or 6 under --budget-s)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--decode-chunk", type=int, default=8, help="VAE decode chunk (diffusers' reference: 8)")
    parser.add_argument("--batch-sizes", default="1,2,4", help="batch sizes for the scaling rows (CPU: 1,2)")
    parser.add_argument("--scaling-preset", default="quality", help="preset whose batch scaling is measured")
    parser.add_argument("--no-low-vram", action="store_true", help="skip the low-VRAM mode row")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the float32 anchor; error columns stay empty")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-component FLOP and time breakdown")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="fit the whole run into this many seconds (0: no budget)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time budget, run nothing")
    parser.add_argument("--weights", type=Path, help="diffusers directory with real weights (first model only)")
    parser.add_argument("--compile-cache-dir", type=Path, help="persist inductor's cache here")
    parser.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an EngineOptions field in every preset, e.g. inductor_tuning=false "
                             "or compile_mode=max-autotune-no-cudagraphs (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default: bench-<card>.json in --out-dir)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS, help="default: scripts/results")
    parser.add_argument("--no-chart", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    env = _environment(args.target, args.dry_run)
    workloads = _workloads(args, env)
    threads = torch.get_num_threads()
    if not env.cuda:
        # The tiny model's kernels are too small to share between threads: on a busy machine the
        # threads' synchronization, not the arithmetic, took most of the time (20 ms per tiny matmul).
        torch.set_num_threads(1)
    try:
        if args.dry_run:
            for workload in workloads:
                _print_plan(_plan(args, env, workload, _flops(workload, env)), workload, env, args.budget_s)
            return 0
        return _run(args, env, workloads, started, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, env: Env, workloads: list[Workload], started: float,
         argv: Sequence[str] | None) -> int:
    card = _card_name(env)
    note = (
        f"CUDA device: {card}."
        if env.cuda
        else "No CUDA: the tiny random model on the CPU, float32 throughout, no torch.compile. "
        "These numbers exercise the benchmark; they say nothing about GPU performance."
    )
    print(f"# {note}", flush=True)
    peak = _matmul_peak_tflops(env)
    print(f"# measured matmul peak: {peak:.2f} TFLOP/s ({'bfloat16' if env.cuda else 'float32'})", flush=True)
    out = args.out or args.out_dir / f"bench-{_slug(card)}.json"
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cuda": env.cuda,
        "tiny_model": not env.cuda,
        "note": note,
        "device": _device_info(env, card),
        "matmul_peak_tflops": round(peak, 3),
        "matmul_dtype": "bfloat16" if env.cuda else "float32",
        "half_dtype": env.half_name,
        "budget_s": args.budget_s or None,
        "models": [],
    }
    deadline = started + args.budget_s if args.budget_s else math.inf
    for index, workload in enumerate(workloads):
        share = (deadline - time.perf_counter()) / (len(workloads) - index) if args.budget_s else math.inf
        model_report = _bench_model(args, env, workload, peak, time.perf_counter() + share,
                                    real_weights=index == 0 and bool(args.weights),
                                    save=lambda partial: _write(report, out, partial))
        report["models"].append(model_report)
        _write(report, out)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    _write(report, out)
    print(f"# wrote {out} ({report['wall_s']} s)")
    if not args.no_chart:
        chart = _write_chart(report, out.with_suffix(".png"))
        print(f"# wrote {chart}" if chart else "# chart skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


def _write(report: dict[str, Any], out: Path, partial_model: dict[str, Any] | None = None) -> None:
    """Write the JSON now (after every row): a run cut short by its lease still leaves its results."""
    snapshot = dict(report)
    if partial_model is not None:
        snapshot["models"] = [*report["models"], {**partial_model, "incomplete": True}]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.partial")
    tmp.write_text(json.dumps(_public(snapshot), indent=2) + "\n")
    tmp.replace(out)


def _public(value: Any) -> Any:
    """The report without its working values (keys starting with an underscore: tensors, raw runs)."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not (isinstance(k, str) and k.startswith("_"))}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


# -- set-up -------------------------------------------------------------------------------------
def _environment(target: str, dry_run: bool) -> Env:
    cuda = torch.cuda.is_available()
    if target == "cuda" and not cuda and not dry_run:
        raise SystemExit("--target cuda: CUDA is not available here (torch.cuda.is_available() is false)")
    if target == "cuda" or (target == "auto" and cuda):
        return Env(torch.device("cuda"), True, torch.float16, "float16")
    return Env(torch.device("cpu"), False, torch.float32, "float32")


def _workloads(args: argparse.Namespace, env: Env) -> list[Workload]:
    names = ["tiny-random"] if not env.cuda else [n.strip() for n in args.models.split(",") if n.strip()]
    workloads = []
    for index, name in enumerate(names):
        spec = get_spec(name)
        if not env.cuda:
            weights, width, height = "tiny-random", args.width or 64, args.height or 64
        else:
            weights = str(args.weights) if index == 0 and args.weights else "random full-size"
            width, height = args.width or spec.native_width, args.height or spec.native_height
        frames = args.frames or spec.default_num_frames
        if not spec.min_num_frames <= frames <= spec.max_num_frames:
            raise SystemExit(f"--frames {frames}: {name} takes {spec.min_num_frames} to {spec.max_num_frames} frames")
        steps = args.steps or spec.default_steps
        measure = args.measure_steps or (min(steps, 6) if args.budget_s else steps)
        if not 2 <= measure <= steps:
            raise SystemExit(f"--measure-steps {measure}: at least 2 (step times are differences) and at most "
                             f"--steps ({steps})")
        workloads.append(Workload(name, spec, weights, width, height, frames, steps, measure, args.decode_chunk))
    return workloads


def _master(workload: Workload, env: Env) -> StableVideoDiffusionPipeline:
    """The fp32 weights every configuration copies, so all compare like for like."""
    if workload.weights == "tiny-random":
        pipe = tiny_random_pipeline()
    elif workload.weights == "random full-size":
        return full_size_random_pipeline(workload.model, env.device, torch.float32)
    else:
        pipe = StableVideoDiffusionPipeline.from_pretrained(workload.weights)  # float32 by default
    pipe.to(env.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clone(master: StableVideoDiffusionPipeline, dtype: torch.dtype) -> StableVideoDiffusionPipeline:
    pipe = StableVideoDiffusionPipeline(
        vae=copy.deepcopy(master.vae).to(dtype),
        image_encoder=copy.deepcopy(master.image_encoder).to(dtype),
        unet=copy.deepcopy(master.unet).to(dtype),
        scheduler=master.scheduler,
        feature_extractor=master.feature_extractor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(workload: Workload) -> Image.Image:
    # A smooth gradient with texture: deterministic, and not flat (a flat image hides decoder issues).
    y, x = np.mgrid[0 : workload.height, 0 : workload.width]
    rng = np.random.default_rng(0)
    rgb = np.stack([x / workload.width, y / workload.height, 0.5 + 0.5 * np.sin(x / 17.0)], axis=-1)
    rgb = np.clip(rgb * 200 + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def _params(workload: Workload, image: Image.Image, seed: int) -> VideoParams:
    """The measured request: the whole video's size and frames, `measure_steps` steps."""
    spec = workload.spec
    return VideoParams(
        image=image, width=workload.width, height=workload.height, num_frames=workload.num_frames,
        fps=spec.default_fps, motion_bucket_id=spec.default_motion_bucket_id,
        noise_aug_strength=spec.default_noise_aug_strength, num_inference_steps=workload.measure_steps, seed=seed,
        min_guidance_scale=spec.default_min_guidance_scale, max_guidance_scale=spec.default_max_guidance_scale,
        decode_chunk_size=workload.decode_chunk,
    )


def _rows(args: argparse.Namespace, env: Env) -> list[RowSpec]:
    """Every row, in the order of priority a budget keeps them: the anchor and diffusers' reference,
    the presets alone (reference first; the scaling preset followed by its larger batches, which
    reuse its compiled graphs), then the 8-bit attention variants and the low-VRAM mode."""
    rows = [] if args.no_fidelity else [RowSpec(ANCHOR, "diffusers", dtype="float32")]
    rows.append(RowSpec(f"diffusers-{env.half_name}", "diffusers"))
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()] if env.cuda else [1, 2]
    scaling = [RowSpec(f"{args.scaling_preset} x{size}", "preset", preset=args.scaling_preset, batch_size=size,
                       reuse_previous=True) for size in sizes if size > 1]
    variants = []
    for entry in (p.strip() for p in args.presets.split(",") if p.strip()):
        name, _, extra = entry.partition("+")
        preset(name)  # an unknown name fails now, before any weights load
        if extra not in ("", "sage"):
            raise SystemExit(f"--presets {entry!r}: the only variant is NAME+sage")
        (variants if extra else rows).append(RowSpec(entry, "preset", preset=name, sage=extra == "sage"))
        if entry == args.scaling_preset:
            rows += scaling
            scaling = []
    rows += variants
    if not args.no_low_vram:
        rows.append(RowSpec("reference+low_vram", "preset", preset="reference", memory_mode="low_vram"))
    if scaling:  # the scaling preset is not among --presets: its rows build their own pipeline
        rows += [dataclasses.replace(scaling[0], reuse_previous=False), *scaling[1:]]
    return rows


# -- the plan and its budget ---------------------------------------------------------------------
@dataclasses.dataclass
class Estimate:
    setup_s: float
    compile_s: float
    run_s: float  # one measured run (measure_steps steps, encode and decode)
    runs: int  # warm-up + timed

    @property
    def total_s(self) -> float:
        return self.setup_s + self.compile_s + self.runs * self.run_s


class Planner:
    """Estimates each row from FLOPs and assumed rates, corrected by what the run has measured so far."""

    def __init__(self, args: argparse.Namespace, env: Env, workload: Workload, flops: dict[str, float]) -> None:
        self._env = env
        self._workload = workload
        self._flops = flops
        self._runs = _runs(args, env)
        self._warmup = args.warmup
        self._run_scale: dict[str, float] = {}  # measured / assumed run time of diffusers, per precision
        self._compile_scale = 1.0  # measured / assumed compile time of the first compiled row
        self._compiled_once = False

    def estimate(self, row: RowSpec) -> Estimate:
        env, workload = self._env, self._workload
        precision = "float32" if row.is_anchor else "half"
        rate = ASSUMED_TFLOPS[env.kind][precision] * 1e12
        unet_rows = 2 * row.batch_size
        scale = self._run_scale.get(precision, 1.0)
        step = unet_rows * self._flops["unet_row"] / rate * scale
        decode = row.batch_size * self._flops["vae_decode"] / rate * scale
        options = _options_for(row, env) if row.kind == "preset" else None
        if options is not None and options.uses_deepcache:
            full = _full_steps(workload.measure_steps, options.deepcache_interval)
            shallow = self._flops["unet_row_shallow"] / self._flops["unet_row"]
            step *= (full + (workload.measure_steps - full) * shallow) / workload.measure_steps
        if row.memory_mode == "low_vram" and env.cuda:
            step *= 1.5  # offload traffic and chunked feed-forward (a guess until measured)
        compile_s = 0.0
        compiles = options is not None and (options.compile_unet or options.compile_vae_decoder)
        if compiles and row.preset and not row.reuse_previous:
            compile_s = ASSUMED_COMPILE_S[env.kind].get(row.preset, 0.0) * self._compile_scale
        runs = self._runs + (0 if row.is_anchor else self._warmup)
        setup = 0.0 if row.reuse_previous else ASSUMED_ROW_SETUP_S[env.kind]
        return Estimate(setup, compile_s, step * workload.measure_steps + decode, runs)

    def learn(self, row: RowSpec, estimate: Estimate, measured: dict[str, Any]) -> None:
        """Later estimates follow what was measured: run times from the diffusers rows (the eager
        baseline of each precision), compile times from the first compiled row."""
        run = measured.get("measured_run_s")
        if row.kind == "diffusers" and run and estimate.run_s > 0:
            precision = "float32" if row.is_anchor else "half"
            self._run_scale[precision] = self._run_scale.get(precision, 1.0) * run / estimate.run_s
        if estimate.compile_s > 0 and measured.get("compile_s") and not self._compiled_once:
            self._compile_scale = measured["compile_s"] / estimate.compile_s
            self._compiled_once = True


def _runs(args: argparse.Namespace, env: Env) -> int:
    if args.runs is not None:
        return args.runs
    return 1 if args.budget_s or not env.cuda else 3


def _full_steps(steps: int, interval: int) -> int:
    return len(range(0, steps, interval)) if interval > 1 else steps


def _plan(args: argparse.Namespace, env: Env, workload: Workload, flops: dict[str, float]) -> dict[str, Any]:
    planner = Planner(args, env, workload, flops)
    fixed = ASSUMED_SETUP_S[env.kind] + (0.0 if args.no_breakdown else 10.0 if env.cuda else 1.0)
    rows, used, base_runs = [], fixed, False
    for row in _rows(args, env):
        estimate = planner.estimate(row)
        fits = not args.budget_s or used + estimate.total_s <= args.budget_s
        if row.reuse_previous:
            fits = fits and base_runs  # a batch-scaling row needs the row it extends
        else:
            base_runs = fits
        rows.append({"row": row, "estimate": estimate, "fits": fits})
        used += estimate.total_s if fits else 0.0
    return {"fixed_s": fixed, "rows": rows, "total_s": used, "flops": flops}


def _print_plan(plan: dict[str, Any], workload: Workload, env: Env, budget: float) -> None:
    flops = plan["flops"]
    print(f"# plan on {env.kind.upper()}: {workload.model} ({workload.weights}) {workload.width}x{workload.height}, "
          f"{workload.num_frames} frames, {workload.steps} steps; each timed run denoises {workload.measure_steps} "
          f"steps{' (whole video extrapolated)' if workload.extrapolated else ''}")
    print(f"# UNet: {flops['unet_row'] * 2 / 1e12:.1f} TFLOP per guided step (shallow DeepCache pass "
          f"{flops['unet_row_shallow'] / flops['unet_row']:.0%} of a full one); VAE decode "
          f"{flops['vae_decode'] / 1e12:.1f} TFLOP per video")
    rates = ASSUMED_TFLOPS[env.kind]
    print(f"# assumed until measured: {rates['half']:g} TFLOP/s half precision, {rates['float32']:g} float32 "
          f"(TF32 off); compile {ASSUMED_COMPILE_S[env.kind]['quality']:g} s quality, "
          f"{ASSUMED_COMPILE_S[env.kind]['fast']:g} s fast; {plan['fixed_s']:g} s set-up")
    print(f"{'row':22} {'setup':>6} {'compile':>8} {'run':>7} {'runs':>5} {'total':>7}  plan")
    for item in plan["rows"]:
        row, estimate = item["row"], item["estimate"]
        print(f"{row.name:22} {estimate.setup_s:6.0f} {estimate.compile_s:8.0f} {estimate.run_s:7.1f} "
              f"{estimate.runs:5d} {estimate.total_s:7.0f}  {'run' if item['fits'] else 'skip (over budget)'}")
    budget_text = f" of a {budget:g} s budget" if budget else " (no budget)"
    print(f"# planned: {plan['total_s']:.0f} s{budget_text}; rows are re-planned with measured times as the run goes")


# -- one model ------------------------------------------------------------------------------------
def _bench_model(
    args: argparse.Namespace, env: Env, workload: Workload, peak: float, deadline: float, real_weights: bool,
    save: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    print(f"\n## {workload.model} ({workload.weights}) {workload.width}x{workload.height}, {workload.num_frames} "
          f"frames, {workload.steps} steps (timed runs: {workload.measure_steps} steps)", flush=True)
    state = GlobalState.capture()
    image = _image(workload)
    params = _params(workload, image, args.seed)
    flops = _flops(workload, env)
    master = _master(workload, env)
    probe = _unet_probe(master, workload, args.seed)
    planner = Planner(args, env, workload, flops)
    result: dict[str, Any] = {
        "model": workload.model, "weights": workload.weights, "width": workload.width, "height": workload.height,
        "num_frames": workload.num_frames, "steps": workload.steps, "measured_steps": workload.measure_steps,
        "extrapolated": workload.extrapolated, "decode_chunk": workload.decode_chunk,
        "unet_tflop_per_guided_step": round(flops["unet_row"] * 2 / 1e12, 4),
        "vae_decode_tflop": round(flops["vae_decode"] / 1e12, 4),
        "runs": [], "skipped": [],
    }
    anchor: dict[str, Any] | None = None
    previous: VideoPipeline | None = None  # the last row's engine, for the batch-scaling rows
    for row in _rows(args, env):
        estimate = planner.estimate(row)
        left = deadline - time.perf_counter()
        reuse = previous if row.reuse_previous else None
        if estimate.total_s > left or (row.reuse_previous and reuse is None):
            reason = "over budget" if estimate.total_s > left else "the row it extends did not run"
            print(f"# skip {row.name}: {reason} (estimated {estimate.total_s:.0f} s, {left:.0f} s left)", flush=True)
            result["skipped"].append({"name": row.name, "estimated_s": round(estimate.total_s, 1),
                                      "left_s": round(left, 1), "reason": reason})
            previous = None if not row.reuse_previous else previous
            continue
        began = time.perf_counter()
        if reuse is None:
            previous = None
            _free(env)
            state.restore()  # every row that builds its own pipeline starts from the same settings
        measured, previous = _bench_row(args, env, workload, master, row, params, probe, reuse)
        measured["row_wall_s"] = round(time.perf_counter() - began, 2)
        measured["estimated_s"] = round(estimate.total_s, 1)
        planner.learn(row, estimate, measured)
        if row.is_anchor:
            anchor = measured
        result["runs"].append(measured)
        print(f"# {row.name}: {measured.get('error') or 'ok'} ({measured['row_wall_s']:.1f} s)", flush=True)
        save(result)
    previous = None
    _free(env)
    state.restore()

    for row in result["runs"]:
        _finish_row(row, anchor, flops, peak, workload, real_weights)
    reference = next((r for r in result["runs"] if r["name"] == f"diffusers-{env.half_name}"), None)
    for row in result["runs"]:
        if reference is not None and reference.get("s_per_video") and row.get("s_per_video"):
            row["speedup_vs_reference"] = round(reference["s_per_video"] / row["s_per_video"], 3)
    if not args.no_breakdown and time.perf_counter() < deadline:
        with state.isolated():
            result["breakdown"] = _breakdown(env, workload, master, probe, flops, reference)
    elif not args.no_breakdown:
        result["skipped"].append({"name": "breakdown", "reason": "over budget"})
    for row in result["runs"]:
        for key in [k for k in row if k.startswith("_")]:
            del row[key]
    _print_rows(result)
    return result


def _flops(workload: Workload, env: Env) -> dict[str, float]:
    """FLOPs of one UNet row (full, DeepCache-shallow) and one video's decode, on the meta device."""
    if workload.weights == "tiny-random":
        pipe = tiny_random_pipeline()
        unet, vae = pipe.unet, pipe.vae
    else:
        unet, vae, _ = empty_full_size_models(workload.model)
    factor = 8  # the VAE's downsampling
    h, w = workload.height // factor, workload.width // factor
    sample = torch.zeros(1, workload.num_frames, unet.config.in_channels, h, w)
    args = (sample, torch.tensor(1.0), torch.zeros(1, 1, unet.config.cross_attention_dim), torch.zeros(1, 3))
    denoiser, tags = DeepCacheDenoiser(unet), component_tags(unet)
    full, (_, deep) = count_flops(denoiser, _call, (*args, None), tags)
    shallow, _ = count_flops(denoiser, _call, (*args, deep), tags)
    decode = 0.0
    for start in range(0, workload.num_frames, workload.decode_chunk):
        frames = min(workload.decode_chunk, workload.num_frames - start)
        counted, _ = count_flops(vae, _decode, (torch.zeros(frames, 4, h, w), frames))
        decode += counted.total
    return {"unet_row": full.total, "unet_row_shallow": shallow.total, "vae_decode": decode,
            "_full": full, "_shallow": shallow}  # type: ignore[dict-item]


def _call(module: torch.nn.Module, *args: Any) -> Any:
    return module(*args)


def _decode(vae: Any, latents: torch.Tensor, frames: int) -> torch.Tensor:
    return vae.decode(latents, num_frames=frames).sample


def _options_for(row: RowSpec, env: Env, overrides: dict[str, Any] | None = None) -> EngineOptions:
    assert row.preset is not None
    options = preset(row.preset, memory_mode=row.memory_mode, sage_attention=row.sage, **(overrides or {}))
    if env.cuda:
        return options
    # The CPU exercises the benchmark, not the GPU's numerics: no compile (inductor's CPU compile takes
    # minutes), float32 throughout (the CPU's half-precision convolutions are slow and erratic).
    changes: dict[str, Any] = {"compile_unet": False, "compile_vae_decoder": False}
    for field in ("dtype", "vae_dtype"):
        if getattr(options, field) != "auto":
            changes[field] = "float32"
    return options.replace(**changes)


def _bench_row(
    args: argparse.Namespace, env: Env, workload: Workload, master: StableVideoDiffusionPipeline, row: RowSpec,
    params: VideoParams, probe: tuple[torch.Tensor, ...], reuse: VideoPipeline | None,
) -> tuple[dict[str, Any], VideoPipeline | None]:
    """Build the row's pipeline (or reuse the one given), warm it up, time it, keep its outputs;
    errors end the row, not the run. Returns the measurements and the engine (None for diffusers)."""
    baseline = _allocated(env)
    measured: dict[str, Any] = {"name": row.name, "kind": row.kind, "preset": row.preset, "batch_size": row.batch_size,
                                "memory_mode": row.memory_mode, "sage_attention": row.sage}
    engine: VideoPipeline | None = None
    try:
        started = time.perf_counter()
        if row.kind == "diffusers":
            runner, step_fn, notes = _diffusers_runner(env, workload, master, row, params, probe)
            measured["memory_mode"] = "normal"
        else:
            options = _options_for(row, env, {"compile_cache_dir": args.compile_cache_dir, **_overrides(args.option)})
            engine = reuse or VideoPipeline(_clone(master, _dtype(options.dtype, env)), workload.spec, options)
            runner, step_fn, notes = _engine_runner(env, engine, row, params, probe)
            measured["memory_mode"] = engine.memory_mode
            if reuse is not None:
                notes = [*notes, "the previous row's engine and compiled graphs"]
        measured["startup_s"] = round(time.perf_counter() - started, 3)
        measured["notes"] = notes
        graphs = compiled_graph_count()
        warm = [runner() for _ in range(0 if row.is_anchor else args.warmup)]
        measured["graphs_compiled"] = compiled_graph_count() - graphs
        if env.cuda:
            torch.cuda.reset_peak_memory_stats(env.device)
        runs = [runner() for _ in range(_runs(args, env))]
        measured["peak_memory_gib"] = (
            round((torch.cuda.max_memory_allocated(env.device) - baseline) / GIB, 3) if env.cuda else None
        )
        measured["_runs"] = runs
        measured["measured_run_s"] = round(statistics.median(r.total_s for r in runs), 4)
        # What the first run took beyond a timed one: the compile, where there was one to do.
        extra = warm[0].total_s - measured["measured_run_s"] if warm and measured["graphs_compiled"] else 0.0
        measured["compile_s"] = round(max(extra, 0.0), 3)
        latents, frames = runner.outputs  # type: ignore[attr-defined]
        measured["finite"] = bool(torch.isfinite(latents).all() and torch.isfinite(frames).all())
        if not measured["finite"]:
            measured["error"] = "NonFiniteOutput: NaN or inf in the latents or frames"
        measured["_latents"], measured["_frames"] = latents.float().cpu(), frames.float().cpu()
        measured["_step"] = step_fn().float().cpu()
        measured["_deepcache"] = _deepcache_interval(row, env)
    except Exception as exc:  # one row's failure (a compile error, an OOM) is a result, not the end
        measured["error"] = f"{type(exc).__name__}: {exc}"
        measured.setdefault("notes", [])
        engine = None
    return measured, engine


class _Runner:
    """Calls one run and keeps the last run's final latents and frames of the first request."""

    def __init__(self, run: Callable[[], tuple[Run, torch.Tensor, torch.Tensor]]) -> None:
        self._run = run
        self.outputs: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))

    def __call__(self) -> Run:
        run, latents, frames = self._run()
        self.outputs = (latents, frames)
        return run


def _diffusers_runner(
    env: Env, workload: Workload, master: StableVideoDiffusionPipeline, row: RowSpec, params: VideoParams,
    probe: tuple[torch.Tensor, ...],
) -> tuple[_Runner, Callable[[], torch.Tensor], list[str]]:
    anchor = row.is_anchor
    pipe = master if anchor else _clone(master, env.half)
    dtype = torch.float32 if anchor else env.half

    def run() -> tuple[Run, torch.Tensor, torch.Tensor]:
        marks: list[float] = []
        captured: dict[str, torch.Tensor] = {}

        def on_step(p: Any, step: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            _sync(env)
            marks.append(time.perf_counter())
            captured["latents"] = kwargs["latents"]
            return kwargs

        with _strict_fp32() if anchor else _nothing():
            _sync(env)
            began = time.perf_counter()
            out = pipe(
                image=params.image, height=params.height, width=params.width, num_frames=params.num_frames,
                num_inference_steps=params.num_inference_steps, fps=params.fps,
                motion_bucket_id=params.motion_bucket_id, noise_aug_strength=params.noise_aug_strength,
                min_guidance_scale=params.min_guidance_scale, max_guidance_scale=params.max_guidance_scale,
                decode_chunk_size=workload.decode_chunk,
                generator=torch.Generator(device=env.device).manual_seed(params.seed),
                output_type="pt", callback_on_step_end=on_step,
            )
            _sync(env)
            ended = time.perf_counter()
        return _split(began, marks, ended), captured["latents"][0], out.frames[0]

    def step() -> torch.Tensor:
        with torch.inference_mode(), _strict_fp32() if anchor else _nothing():
            inputs = [t.to(dtype) if t.is_floating_point() and t.ndim else t for t in probe]
            out: torch.Tensor = pipe.unet(*inputs[:2], encoder_hidden_states=inputs[2], added_time_ids=inputs[3],
                                          return_dict=False)[0]
        return out

    notes = [f"diffusers StableVideoDiffusionPipeline in {'float32, TF32 off' if anchor else env.half_name}: "
             "default attention, fp32 VAE encode (force_upcast)"]
    return _Runner(run), step, notes


def _engine_runner(
    env: Env, pipe: VideoPipeline, row: RowSpec, params: VideoParams, probe: tuple[torch.Tensor, ...]
) -> tuple[_Runner, Callable[[], torch.Tensor], list[str]]:
    requests = [dataclasses.replace(params, seed=params.seed + i) for i in range(row.batch_size)]

    def run() -> tuple[Run, torch.Tensor, torch.Tensor]:
        marks: list[float] = []

        def on_progress(done: int, total: int) -> None:
            _sync(env)
            marks.append(time.perf_counter())

        items = [BatchItem(p, on_progress=on_progress if i == 0 else None) for i, p in enumerate(requests)]
        _sync(env)
        began = time.perf_counter()
        results = pipe.run_batch(items)
        _sync(env)
        ended = time.perf_counter()
        first = results[0]
        if first.error is not None:
            raise RuntimeError(f"{type(first.error).__name__}: {first.error}")
        assert first.latents is not None and first.frames is not None
        return _split(began, marks, ended), first.latents, first.frames

    def step() -> torch.Tensor:
        return pipe.denoise_once(*probe)

    return _Runner(run), step, pipe.engine_notes


def _split(began: float, marks: list[float], ended: float) -> Run:
    """A run from its start, the marks taken after every step (device synchronized) and its end."""
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return Run(total_s=ended - began, first_s=marks[0] - began, steps_s=steps, post_s=ended - marks[-1])


def _pre_s(run: Run, interval: int) -> float:
    """The set-up before step 0: the time to step 0's end less one full step (step 0 is always full)."""
    return max(run.first_s - _step_times(run, interval)[0], 0.0)


def _deepcache_interval(row: RowSpec, env: Env) -> int:
    if row.kind != "preset":
        return 0
    options = _options_for(row, env)
    return options.deepcache_interval if options.uses_deepcache else 0


def _dtype(name: str, env: Env) -> torch.dtype:
    if name == "auto":
        return env.half
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# -- global state: every row starts from the same process-wide settings --------------------------
@dataclasses.dataclass
class GlobalState:
    """Process-wide switches a preset may flip (cuDNN autotuning, TF32, inductor and dynamo config,
    the environment that points inductor at its cache), captured once and restored for every row."""

    cudnn_benchmark: bool
    cudnn_tf32: bool
    matmul_tf32: bool
    matmul_precision: str
    inductor: dict[str, Any]
    dynamo: dict[str, Any]
    environ: dict[str, str]

    @classmethod
    def capture(cls) -> GlobalState:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        return cls(
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            matmul_precision=torch.get_float32_matmul_precision(),
            inductor=inductor_config.get_config_copy(),
            dynamo=dynamo_config.get_config_copy(),
            environ=dict(os.environ),
        )

    def restore(self) -> None:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.allow_tf32 = self.cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.matmul_tf32
        torch.set_float32_matmul_precision(self.matmul_precision)
        for config, saved in ((inductor_config, self.inductor), (dynamo_config, self.dynamo)):
            # Only what changed: setting a deprecated entry back to its value would warn.
            current = config.get_config_copy()
            config.load_config({k: v for k, v in saved.items() if current.get(k) != v})
        os.environ.clear()
        os.environ.update(self.environ)
        torch._dynamo.reset()

    @contextmanager
    def isolated(self) -> Iterator[None]:
        self.restore()
        try:
            yield
        finally:
            self.restore()


# -- measurements ---------------------------------------------------------------------------------
def _allocated(env: Env) -> int:
    return torch.cuda.memory_allocated(env.device) if env.cuda else 0


def _overrides(pairs: list[str]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(EngineOptions)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"--option {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        default = fields[name].default
        if raw.lower() in ("none", "null"):
            changes[name] = None
        elif isinstance(default, bool):
            changes[name] = raw.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            changes[name] = int(raw)
        elif name == "compile_cache_dir":
            changes[name] = Path(raw)
        else:
            changes[name] = raw
    return changes


def _video_time(run: Run, steps: int, interval: int) -> float:
    """A whole video of `steps` steps from one measured run: set-up, each step by kind, decode."""
    full, shallow = _step_times(run, interval)
    n_full = _full_steps(steps, interval) if interval else steps
    return _pre_s(run, interval) + n_full * full + (steps - n_full) * (shallow if shallow is not None else full) \
        + run.post_s


def _step_times(run: Run, interval: int) -> tuple[float, float | None]:
    """Median full-step and shallow-step times (step i's time is `steps_s[i - 1]`)."""
    if not interval:
        return statistics.median(run.steps_s), None
    full = [t for i, t in enumerate(run.steps_s, start=1) if i % interval == 0]
    shallow = [t for i, t in enumerate(run.steps_s, start=1) if i % interval != 0]
    shallow_s = statistics.median(shallow) if shallow else None
    return (statistics.median(full) if full else shallow_s or 0.0), shallow_s


def _finish_row(
    row: dict[str, Any], anchor: dict[str, Any] | None, flops: dict[str, float], peak: float, workload: Workload,
    real_weights: bool,
) -> None:
    if "_runs" not in row:
        return
    runs: list[Run] = row["_runs"]
    interval = row["_deepcache"]
    size = row["batch_size"]
    per_video = [_video_time(run, workload.steps, interval) / size for run in runs]
    median = statistics.median(per_video)
    full, shallow = _step_times(runs[-1], interval)
    row.update({
        "s_per_video": round(median, 4),
        "s_per_video_runs": [round(t, 4) for t in per_video],
        "extrapolated": workload.extrapolated,
        "videos_per_gpu_hour": round(3600 / median, 1) if median > 0 else None,
        "pre_s": round(statistics.median(_pre_s(r, interval) for r in runs), 4),
        "step_s": round(full, 5),
        "shallow_step_s": None if shallow is None else round(shallow, 5),
        "decode_s": round(statistics.median(r.post_s for r in runs), 4),
        "denoise_s": round(median * size - statistics.median(_pre_s(r, interval) + r.post_s for r in runs), 4),
    })
    unet_rows = 2 * size  # every benchmarked request is guided: an unconditional and a conditional row
    achieved = unet_rows * flops["unet_row"] / full / 1e12 if full > 0 else float("nan")
    row["unet_tflops"] = float(f"{achieved:.4g}")
    row["unet_mfu"] = round(achieved / peak, 4) if peak > 0 else None
    row["latent_rel_error"] = row["frames_psnr_db"] = row["unet_step_rel_error"] = None
    if anchor is not None and "_latents" in anchor:
        if row is anchor:
            row["latent_rel_error"] = row["unet_step_rel_error"] = 0.0
        else:
            row["latent_rel_error"] = _rel_error(row["_latents"], anchor["_latents"])
            row["unet_step_rel_error"] = _rel_error(row["_step"], anchor["_step"])
            row["frames_psnr_db"] = _psnr(row["_frames"], anchor["_frames"])
    row["fidelity_steps"] = workload.measure_steps
    row["real_weights"] = real_weights


def _rel_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float((value - truth).norm() / truth.norm().clamp_min(1e-12))


def _psnr(frames: torch.Tensor, truth: torch.Tensor) -> float | None:
    mse = float(((frames - truth) ** 2).mean())
    return round(10 * math.log10(1 / mse), 2) if mse > 0 else None  # None: identical frames


def _unet_probe(
    master: StableVideoDiffusionPipeline, workload: Workload, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed guided first-step UNet input (uncond + cond rows), fp32, on the device."""
    unet, device = master.unet, master.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (2, workload.num_frames, unet.config.in_channels, workload.height // master.vae_scale_factor,
             workload.width // master.vae_scale_factor)
    sample = torch.randn(shape, generator=generator).to(device)
    context = torch.randn(2, 1, unet.config.cross_attention_dim, generator=generator).to(device)
    context[0] = 0  # the unconditional row, as the pipeline builds it
    spec = workload.spec
    time_ids = torch.tensor([[spec.default_fps - 1, spec.default_motion_bucket_id, spec.default_noise_aug_strength]] * 2,
                            device=device)
    timestep = torch.tensor(0.25 * math.log(700.0), device=device)  # the first Karras step (sigma_max)
    return sample, timestep, context, time_ids


def _breakdown(
    env: Env, workload: Workload, master: StableVideoDiffusionPipeline, probe: tuple[torch.Tensor, ...],
    flops: dict[str, Any], reference: dict[str, Any] | None,
) -> dict[str, Any]:
    """FLOPs and time of one guided UNet step by component (eager, half precision), and the ceilings."""
    full_flops: Breakdown = flops["_full"]
    shallow_flops: Breakdown = flops["_shallow"]
    unet = copy.deepcopy(master.unet).to(env.half)
    denoiser, tags = DeepCacheDenoiser(unet), component_tags(unet)
    inputs = tuple(t.to(env.half) if t.is_floating_point() and t.ndim else t for t in probe)
    with torch.inference_mode():
        _, deep = denoiser(*inputs, None)  # warm-up, and the deep features for the shallow pass
        denoiser(*inputs, deep)
    full_time = time_step(denoiser, _call, (*inputs, None), tags)
    shallow_time = time_step(denoiser, _call, (*inputs, deep), tags)
    shallow_fraction = shallow_time.total / full_time.total if full_time.total else None
    # A shallow pass is a subset of a full one: a measured fraction above 1 is timing noise.
    bounds = ceilings(full_time, None if shallow_fraction is None else min(shallow_fraction, 1.0), 3)
    result: dict[str, Any] = {
        "flops_per_row_step": full_flops.as_dict(1e-12),
        "flops_shallow_fraction": round(shallow_flops.total / full_flops.total, 4),
        "time_guided_step_s": full_time.as_dict(),
        "time_shallow_fraction": None if shallow_fraction is None else round(shallow_fraction, 4),
        "note": "time: one eager half-precision guided step, the device synchronized around every component "
                "(the syncs cost a little); shares of time, not of FLOPs, bound the speed-ups",
        "ceilings": [],
    }
    if reference is not None and reference.get("s_per_video"):
        video = reference["s_per_video"]
        outside = reference["pre_s"] + reference["decode_s"]
        result["reference_video_s"] = {"total": video, "outside_unet": round(outside, 4)}
    for bound in bounds:
        entry = {"name": bound.name, "unet_speedup": round(bound.unet_speedup, 3), "assumption": bound.assumption}
        if "reference_video_s" in result:
            video, outside = result["reference_video_s"]["total"], result["reference_video_s"]["outside_unet"]
            entry["video_speedup"] = round(video / (outside + (video - outside) / bound.unet_speedup), 3)
        result["ceilings"].append(entry)
    del unet, denoiser
    return result


def _matmul_peak_tflops(env: Env) -> float:
    """Best of a few large square matmuls: what this card (or CPU) actually sustains."""
    n, dtype = (8192, torch.bfloat16) if env.cuda else (512, torch.float32)
    a = torch.randn(n, n, device=env.device, dtype=dtype)
    b = torch.randn(n, n, device=env.device, dtype=dtype)
    best = float("inf")
    for _ in range(3 if env.cuda else 2):
        _sync(env)
        began = time.perf_counter()
        for _ in range(10 if env.cuda else 2):
            a @ b
        _sync(env)
        best = min(best, (time.perf_counter() - began) / (10 if env.cuda else 2))
    return 2 * n**3 / best / 1e12


@contextmanager
def _strict_fp32() -> Iterator[None]:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _sync(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize(env.device)


def _free(env: Env) -> None:
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()


# -- reporting ------------------------------------------------------------------------------------
def _card_name(env: Env) -> str:
    return torch.cuda.get_device_name(env.device) if env.cuda else "cpu"


def _device_info(env: Env, card: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": card,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda_version": torch.version.cuda,
    }
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / GIB, 1)
    return info


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "device"


def _print_rows(model: dict[str, Any]) -> None:
    mark = "*" if model["extrapolated"] else ""
    print(f"{'config':22} {'s/video' + mark:>9} {'speedup':>8} {'step s':>8} {'decode s':>9} {'peak GiB':>9} "
          f"{'UNet TF/s':>10} {'latent err':>11} {'PSNR dB':>8} {'step err':>9}")
    for row in model["runs"]:
        def fmt(key: str, spec: str, row: dict[str, Any] = row) -> str:
            value = row.get(key)
            return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

        print(f"{row['name']:22} {fmt('s_per_video', '9.3f')} {fmt('speedup_vs_reference', '8.2f')} "
              f"{fmt('step_s', '8.4f')} {fmt('decode_s', '9.3f')} {fmt('peak_memory_gib', '9.2f')} "
              f"{fmt('unet_tflops', '10.2f')} {fmt('latent_rel_error', '11.2e')} {fmt('frames_psnr_db', '8.1f')} "
              f"{fmt('unet_step_rel_error', '9.2e')}", flush=True)
    if mark:
        print(f"* extrapolated to {model['steps']} steps from timed runs of {model['measured_steps']} steps; "
              f"errors are those of the {model['measured_steps']}-step video")
    for row in model["runs"]:
        if row.get("error"):
            print(f"  {row['name']}: ERROR {row['error']}")
        for note in row.get("notes", []):
            print(f"  {row['name']}: {note}")
    for skipped in model["skipped"]:
        print(f"  {skipped['name']}: skipped, {skipped['reason']} (estimated {skipped['estimated_s']} s, "
              f"{skipped['left_s']} s left)")
    breakdown = model.get("breakdown")
    if breakdown:
        flops, timed = breakdown["flops_per_row_step"], breakdown["time_guided_step_s"]
        print(f"{'component':24} {'FLOP share':>11} {'time share':>11}")
        for name in flops["shares"]:
            print(f"{name:24} {flops['shares'][name]:11.1%} {timed['shares'].get(name, 0.0):11.1%}")
        print(f"{'fp8-eligible linears':24} {flops['fp8_eligible_share']:11.1%} {timed['fp8_eligible_share']:11.1%}")
        print(f"DeepCache shallow pass: {breakdown['flops_shallow_fraction']:.1%} of a full pass's FLOPs, "
              f"{breakdown['time_shallow_fraction']:.1%} of its time")
        for bound in breakdown["ceilings"]:
            video = f", video {bound['video_speedup']:.2f}x" if "video_speedup" in bound else ""
            print(f"ceiling {bound['name']:34} UNet {bound['unet_speedup']:.2f}x{video}  ({bound['assumption']})")


def _write_chart(report: dict[str, Any], path: Path) -> Path | None:
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4 * len(models)), squeeze=False)
    for (speed, scaling), model in zip(axes, models, strict=False):
        singles = [r for r in model["runs"] if r["batch_size"] == 1 and r.get("s_per_video")]
        hatch = "//" if model["extrapolated"] else None
        speed.barh([r["name"] for r in singles], [r["s_per_video"] for r in singles], color="tab:blue", hatch=hatch)
        for y, r in enumerate(singles):
            speed.annotate(f" {r.get('speedup_vs_reference', 0):.2f}x", (r["s_per_video"], y), va="center")
        speed.invert_yaxis()
        label = "seconds per video (median)"
        if model["extrapolated"]:
            label += f", EXTRAPOLATED from {model['measured_steps']} of {model['steps']} steps"
        speed.set_xlabel(label)
        speed.set_title(f"{model['model']} {model['width']}x{model['height']}, {model['num_frames']} frames, "
                        f"{model['steps']} steps")
        by_preset: dict[str, list[dict[str, Any]]] = {}
        for r in model["runs"]:
            if r["kind"] == "preset" and r["memory_mode"] == "normal" and not r["sage_attention"] \
                    and r.get("videos_per_gpu_hour"):
                by_preset.setdefault(r["preset"], []).append(r)
        for name, runs in by_preset.items():
            if len(runs) > 1:
                scaling.plot([r["batch_size"] for r in runs], [r["videos_per_gpu_hour"] for r in runs],
                             marker="o", label=name)
        scaling.set_xlabel("batch size")
        scaling.set_ylabel("videos per GPU-hour" + (" (extrapolated)" if model["extrapolated"] else ""))
        scaling.set_title("batch-size scaling")
        if scaling.get_legend_handles_labels()[0]:
            scaling.legend()
    fig.suptitle(f"{report['device']['name']}: {report['note']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
