"""Benchmark: diffusers' StableVideoDiffusionPipeline against our engine presets, in one process.

    python scripts/bench_gpu.py                       # on a CUDA node: SVD-XT and SVD, full size
    python scripts/bench_gpu.py --models svd-xt --presets reference,quality --runs 5
    svd-serve bench --weights /models/svd-xt          # real weights: PSNR of frames too

For each model (SVD-XT at 576x1024, 25 frames, 25 steps; SVD at 14 frames) it runs diffusers'
reference (fp16, its defaults, `decode_chunk_size=8`) and each preset on identical weights, and
reports seconds per video (median of `--runs` after `--warmup`), videos per GPU-hour, peak memory,
start-up and compile time, the UNet's achieved TFLOP/s against this card's measured matmul peak,
batch-size scaling, a low-VRAM run, and fidelity against an fp32 run of the same weights (relative
error of the final latents and of one UNet step; PSNR of frames when real weights are given).
Writes JSON and, when matplotlib is importable, a PNG chart.

Without CUDA it runs the same comparison on the tiny random model on the CPU, with bfloat16 in
place of float16 (the CPU has no fast float16 kernels) and without torch.compile (inductor's CPU
compile takes minutes), and says so in its output and its JSON. Those numbers say nothing about GPUs.

Needs only torch, diffusers, transformers and this repository's `models` and `pipelines`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import math
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
from torch.utils.flop_counter import FlopCounterMode

from models.full_size import full_size_random_pipeline
from models.registry import get_spec
from models.specs import ModelSpec
from models.tiny_random import tiny_random_pipeline
from pipelines import BatchItem, EngineOptions, SizeBucket, VideoParams, preset
from pipelines.denoisers import DeepCacheDenoiser
from pipelines.sampler import SampleResult
from pipelines.svd import VideoPipeline

GIB = 1024**3
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one model is benchmarked on."""

    model: str
    spec: ModelSpec
    weights: str  # "random full-size", "tiny-random", or the directory of real weights
    width: int
    height: int
    num_frames: int
    steps: int
    decode_chunk: int


@dataclasses.dataclass(frozen=True)
class Env:
    """The machine: where to run and in which half precision."""

    device: torch.device
    cuda: bool
    half: torch.dtype  # float16 on CUDA; bfloat16 stands in on the CPU
    half_name: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="svd-xt,svd", help="comma-separated (CUDA only; the CPU runs tiny-random)")
    parser.add_argument("--presets", default="reference,quality,fast", help="engine presets to compare")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per configuration (default 3 GPU, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25 GPU, 4 CPU)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--decode-chunk", type=int, default=8, help="VAE decode chunk (diffusers' reference: 8)")
    parser.add_argument("--batch-sizes", default="1,2,4", help="batch sizes for the scaling runs (CPU: 1,2)")
    parser.add_argument("--scaling-preset", default="quality", help="preset whose batch scaling is measured")
    parser.add_argument("--no-low-vram", action="store_true", help="skip the low-VRAM mode run")
    parser.add_argument("--no-fidelity", action="store_true",
                        help="skip the fp32 anchor run (minutes at full size); error columns stay empty")
    parser.add_argument("--weights", type=Path, help="diffusers directory with real weights (first model only)")
    parser.add_argument("--compile-cache-dir", type=Path, help="persist inductor's cache here")
    parser.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an EngineOptions field in every preset, e.g. inductor_tuning=false "
                             "or compile_mode=max-autotune-no-cudagraphs (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default scripts/results/bench-<device>.json)")
    parser.add_argument("--no-chart", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = _environment()
    card = _card_name(env)
    note = (
        f"CUDA device: {card}."
        if env.cuda
        else "No CUDA: the tiny random model on the CPU, bfloat16 standing in for float16, no torch.compile. "
        "These numbers exercise the benchmark; they say nothing about GPU performance."
    )
    print(f"# {note}", flush=True)
    peak = _matmul_peak_tflops(env)
    print(f"# measured matmul peak: {peak:.2f} TFLOP/s ({'bfloat16' if env.cuda else 'float32'})", flush=True)

    report: dict[str, Any] = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuda": env.cuda,
        "tiny_model": not env.cuda,
        "note": note,
        "device": _device_info(env, card),
        "matmul_peak_tflops": round(peak, 3),
        "matmul_dtype": "bfloat16" if env.cuda else "float32",
        "half_dtype": env.half_name,
        "models": [],
    }
    for index, workload in enumerate(_workloads(args, env)):
        report["models"].append(_bench_model(args, env, workload, peak, real_weights=index == 0 and bool(args.weights)))

    out = args.out or DEFAULT_RESULTS / f"bench-{_slug(card)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"# wrote {out}")
    if not args.no_chart:
        chart = _write_chart(report, out.with_suffix(".png"))
        print(f"# wrote {chart}" if chart else "# chart skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


# -- set-up -------------------------------------------------------------------------------------
def _environment() -> Env:
    if torch.cuda.is_available():
        return Env(torch.device("cuda"), True, torch.float16, "float16")
    return Env(torch.device("cpu"), False, torch.bfloat16, "bfloat16")


def _workloads(args: argparse.Namespace, env: Env) -> list[Workload]:
    if not env.cuda:
        spec = get_spec("tiny-random")
        return [Workload("tiny-random", spec, "tiny-random", args.width or 64, args.height or 64,
                         spec.default_num_frames, args.steps or spec.default_steps, args.decode_chunk)]
    workloads = []
    for index, name in enumerate(n.strip() for n in args.models.split(",") if n.strip()):
        spec = get_spec(name)
        weights = str(args.weights) if index == 0 and args.weights else "random full-size"
        workloads.append(Workload(name, spec, weights, args.width or spec.native_width,
                                  args.height or spec.native_height, spec.default_num_frames,
                                  args.steps or spec.default_steps, args.decode_chunk))
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
    spec = workload.spec
    return VideoParams(
        image=image, width=workload.width, height=workload.height, num_frames=workload.num_frames,
        fps=spec.default_fps, motion_bucket_id=spec.default_motion_bucket_id,
        noise_aug_strength=spec.default_noise_aug_strength, num_inference_steps=workload.steps, seed=seed,
        min_guidance_scale=spec.default_min_guidance_scale, max_guidance_scale=spec.default_max_guidance_scale,
        decode_chunk_size=workload.decode_chunk,
    )


# -- one model ------------------------------------------------------------------------------------
def _bench_model(
    args: argparse.Namespace, env: Env, workload: Workload, peak: float, real_weights: bool
) -> dict[str, Any]:
    print(f"\n## {workload.model} ({workload.weights}) {workload.width}x{workload.height}, "
          f"{workload.num_frames} frames, {workload.steps} steps", flush=True)
    runs_n = args.runs or (3 if env.cuda else 2)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()] if env.cuda else [1, 2]
    image = _image(workload)
    params = _params(workload, image, args.seed)
    master = _master(workload, env)
    probe = _unet_probe(master, workload, args.seed)
    flops = _flop_counts(master, workload, probe)

    anchor = None if args.no_fidelity else _anchor(master, workload, params, probe)

    # Each configuration's pipeline lives only inside its call; free its memory before the next.
    rows: list[dict[str, Any]] = []
    reference = _bench_diffusers(env, workload, master, params, probe, runs_n, args.warmup)
    rows.append(reference)
    _free(env)
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        sizes = batch_sizes if name == args.scaling_preset else [1]
        rows.extend(_bench_preset(args, env, workload, master, name, params, probe, runs_n, sizes))
        _free(env)
    if not args.no_low_vram:
        rows.extend(_bench_preset(args, env, workload, master, "reference", params, probe, runs_n, [1],
                                  memory_mode="low_vram"))
        _free(env)

    base = reference["s_per_video"]
    for row in rows:
        _finish_row(row, base, anchor, flops, peak, real_weights)
    _print_rows(rows)
    return {
        "model": workload.model,
        "weights": workload.weights,
        "width": workload.width,
        "height": workload.height,
        "num_frames": workload.num_frames,
        "steps": workload.steps,
        "decode_chunk": workload.decode_chunk,
        "unet_tflop_per_guided_step": round(flops["unet_row"] * 2 / 1e12, 4),
        "vae_decode_tflop": round(flops["vae_decode"] / 1e12, 4),
        "runs": rows,
    }


def _anchor(
    master: StableVideoDiffusionPipeline, workload: Workload, params: VideoParams, probe: tuple[torch.Tensor, ...]
) -> tuple[SampleResult, torch.Tensor]:
    """Our engine in strict fp32 (TF32 off) on the master weights: diffusers' numerics, exactly."""
    with _strict_fp32():
        pipe = VideoPipeline(master, workload.spec, EngineOptions(name="fp32", memory_mode="normal"))
        result = pipe.run_batch([BatchItem(params)])[0]
        step = pipe.denoise_once(*probe)
    if result.latents is None or result.frames is None:
        raise RuntimeError(f"The fp32 anchor run failed: {result.error}")
    return result, step


def _bench_diffusers(
    env: Env, workload: Workload, master: StableVideoDiffusionPipeline, params: VideoParams,
    probe: tuple[torch.Tensor, ...], runs_n: int, warmup: int,
) -> dict[str, Any]:
    baseline = _allocated(env)
    started = time.perf_counter()
    pipe = _clone(master, env.half)
    startup = time.perf_counter() - started
    captured: dict[str, Any] = {}

    def run() -> float:
        marks: list[float] = []

        def on_step(p: Any, step: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            _sync(env)
            marks.append(time.perf_counter())
            captured["latents"] = kwargs["latents"]
            return kwargs

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
        captured["frames"] = out.frames[0]
        # The loop's start is not observable from outside; extrapolate from the step marks.
        captured["denoise_s"] = (marks[-1] - marks[0]) * len(marks) / max(len(marks) - 1, 1)
        return time.perf_counter() - began

    times, peak_mem = _timed(env, run, runs_n, warmup, baseline)
    with torch.inference_mode():
        step = pipe.unet(*[t.to(env.half) if t.is_floating_point() and t.ndim else t for t in probe],
                         return_dict=False)[0]
    row = _row(f"diffusers-{env.half_name}", "diffusers", None, 1, "normal", times, peak_mem, startup, 0.0)
    row.update(_numerics(captured["latents"][0], captured["frames"], step, captured["denoise_s"],
                         rows_full=2 * params.num_inference_steps, rows_cached=0))
    row["notes"] = ["diffusers StableVideoDiffusionPipeline, default attention, fp32 VAE encode (force_upcast)"]
    return row


def _bench_preset(
    args: argparse.Namespace, env: Env, workload: Workload, master: StableVideoDiffusionPipeline, name: str,
    params: VideoParams, probe: tuple[torch.Tensor, ...], runs_n: int, batch_sizes: list[int],
    memory_mode: str = "normal",
) -> list[dict[str, Any]]:
    options = preset(name, memory_mode=memory_mode, compile_cache_dir=args.compile_cache_dir,
                     **_overrides(args.option))
    options = _for_this_machine(options, env)
    baseline = _allocated(env)
    started = time.perf_counter()
    pipe = VideoPipeline(_clone(master, _dtype(options.dtype, env)), workload.spec, options)
    warm = pipe.warm_up([SizeBucket(workload.width, workload.height, workload.num_frames)], max(batch_sizes))
    startup = time.perf_counter() - started
    label = name if memory_mode == "normal" else f"{name}+{memory_mode}"
    rows = []
    for size in batch_sizes:
        items = [BatchItem(dataclasses.replace(params, seed=params.seed + i)) for i in range(size)]
        captured: dict[str, Any] = {}

        def run(items: list[BatchItem] = items, captured: dict[str, Any] = captured) -> float:
            began = time.perf_counter()
            results = pipe.run_batch(items)
            _sync(env)
            captured["result"] = results[0]
            captured["timings"] = pipe.last_timings
            return time.perf_counter() - began

        times, peak_mem = _timed(env, run, runs_n, args.warmup, baseline)
        row = _row(label if size == 1 else f"{label} x{size}", "preset", name, size, pipe.memory_mode,
                   [t / size for t in times], peak_mem, startup, warm.seconds if options.compile_unet else 0.0)
        result, timings = captured["result"], captured["timings"]
        if result.error is not None:
            row["error"] = f"{type(result.error).__name__}: {result.error}"
        else:
            step = pipe.denoise_once(*probe)
            row.update(_numerics(result.latents, result.frames, step, timings.denoise_s,
                                 rows_full=timings.unet_rows_full, rows_cached=timings.unet_rows_cached))
        row["graphs_compiled"] = warm.graphs_compiled
        row["notes"] = pipe.engine_notes
        rows.append(row)
    return rows


def _for_this_machine(options: EngineOptions, env: Env) -> EngineOptions:
    if env.cuda:
        return options
    changes: dict[str, Any] = {"compile_unet": False, "compile_vae_decoder": False}
    for field in ("dtype", "vae_dtype"):
        if getattr(options, field) == "float16":
            changes[field] = env.half_name
    return options.replace(**changes)


def _dtype(name: str, env: Env) -> torch.dtype:
    if name == "auto":
        return env.half
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# -- measurements ---------------------------------------------------------------------------------
def _timed(
    env: Env, run: Callable[[], float], runs_n: int, warmup: int, baseline: int
) -> tuple[list[float], float | None]:
    """Per-run seconds, and the configuration's own peak memory (its weights and activations: the
    fp32 master copy every configuration is cloned from is resident before and is not counted)."""
    for _ in range(warmup):
        run()
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    times = [run() for _ in range(runs_n)]
    peak_mem = (torch.cuda.max_memory_allocated(env.device) - baseline) / GIB if env.cuda else None
    return times, peak_mem


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


def _row(
    name: str, kind: str, preset_name: str | None, batch_size: int, memory_mode: str, per_video: list[float],
    peak_mem: float | None, startup: float, compile_s: float,
) -> dict[str, Any]:
    median = statistics.median(per_video)
    return {
        "name": name,
        "kind": kind,
        "preset": preset_name,
        "batch_size": batch_size,
        "memory_mode": memory_mode,
        "s_per_video": round(median, 4),
        "s_per_video_runs": [round(t, 4) for t in per_video],
        "videos_per_gpu_hour": round(3600 / median, 1),
        "peak_memory_gib": None if peak_mem is None else round(peak_mem, 3),
        "startup_s": round(startup, 3),
        "compile_s": round(compile_s, 3),
    }


def _numerics(
    latents: torch.Tensor, frames: torch.Tensor, step: torch.Tensor, denoise_s: float, rows_full: int, rows_cached: int
) -> dict[str, Any]:
    return {
        "_latents": latents.float().cpu(),
        "_frames": frames.float().cpu(),
        "_step": step.float().cpu(),
        "_denoise_s": denoise_s,
        "_rows": (rows_full, rows_cached),
    }


def _finish_row(
    row: dict[str, Any], base: float, anchor: tuple[SampleResult, torch.Tensor] | None, flops: dict[str, float],
    peak: float, real_weights: bool,
) -> None:
    row["speedup_vs_reference"] = round(base / row["s_per_video"], 3)
    if "_latents" not in row:
        return
    latents, frames, step = row.pop("_latents"), row.pop("_frames"), row.pop("_step")
    denoise_s, (full, cached) = row.pop("_denoise_s"), row.pop("_rows")
    unet_flop = full * flops["unet_row"] + cached * flops["unet_row_shallow"]
    achieved = unet_flop / denoise_s / 1e12 if denoise_s > 0 else float("nan")
    row["denoise_s"] = round(denoise_s, 4)
    row["unet_tflops"] = round(achieved, 3)
    row["unet_mfu"] = round(achieved / peak, 4) if peak > 0 else None
    row["latent_rel_error"] = row["unet_step_rel_error"] = row["psnr_db"] = None
    if anchor is not None:
        result, anchor_step = anchor
        assert result.latents is not None and result.frames is not None
        row["latent_rel_error"] = _rel_error(latents, result.latents.float().cpu())
        row["unet_step_rel_error"] = _rel_error(step, anchor_step.float().cpu())
        if real_weights:
            row["psnr_db"] = _psnr(frames, result.frames.float().cpu())


def _rel_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float((value - truth).norm() / truth.norm().clamp_min(1e-12))


def _psnr(frames: torch.Tensor, truth: torch.Tensor) -> float:
    mse = float(((frames - truth) ** 2).mean())
    return round(10 * math.log10(1 / mse), 2) if mse > 0 else float("inf")


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


def _flop_counts(
    master: StableVideoDiffusionPipeline, workload: Workload, probe: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    """FLOPs of one UNet row (full and DeepCache-shallow) and of one video's VAE decode."""
    sample, timestep, context, time_ids = (t[:1] if t.ndim else t for t in probe)
    denoiser = DeepCacheDenoiser(master.unet)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            _, deep = denoiser(sample, timestep, context, time_ids, None)
        full = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            denoiser(sample, timestep, context, time_ids, deep)
        shallow = counter.get_total_flops()
        latents = torch.zeros(workload.num_frames, 4, *sample.shape[-2:], device=master.device)
        counter = FlopCounterMode(display=False)
        with counter:
            for start in range(0, workload.num_frames, workload.decode_chunk):
                chunk = latents[start : start + workload.decode_chunk]
                master.vae.decode(chunk, num_frames=chunk.shape[0])
        vae = counter.get_total_flops()
    return {"unet_row": float(full), "unet_row_shallow": float(shallow), "vae_decode": float(vae)}


def _matmul_peak_tflops(env: Env) -> float:
    """Best of a few large square matmuls: what this card (or CPU) actually sustains."""
    n, dtype = (8192, torch.bfloat16) if env.cuda else (1024, torch.float32)
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


def _sync(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize(env.device)


def _free(env: Env) -> None:
    import gc

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


def _print_rows(rows: list[dict[str, Any]]) -> None:
    header = f"{'config':24} {'s/video':>9} {'videos/h':>9} {'speedup':>8} {'peak GiB':>9} {'UNet TF/s':>10} " \
             f"{'latent err':>11} {'step err':>9}"
    print(header)
    for row in rows:
        def fmt(key: str, spec: str, row: dict[str, Any] = row) -> str:
            value = row.get(key)
            return format(value, spec) if isinstance(value, (int, float)) else "-"

        print(f"{row['name']:24} {fmt('s_per_video', '9.3f')} {fmt('videos_per_gpu_hour', '9.1f')} "
              f"{fmt('speedup_vs_reference', '8.2f')} {fmt('peak_memory_gib', '9.2f')} {fmt('unet_tflops', '10.2f')} "
              f"{fmt('latent_rel_error', '11.2e')} {fmt('unet_step_rel_error', '9.2e')}", flush=True)


def _write_chart(report: dict[str, Any], path: Path) -> Path | None:
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4 * len(models)), squeeze=False)
    for (speed, scaling), model in zip(axes, models, strict=False):
        singles = [r for r in model["runs"] if r["batch_size"] == 1]
        speed.barh([r["name"] for r in singles], [r["s_per_video"] for r in singles], color="tab:blue")
        for y, r in enumerate(singles):
            speed.annotate(f" {r['speedup_vs_reference']:.2f}x", (r["s_per_video"], y), va="center")
        speed.invert_yaxis()
        speed.set_xlabel("seconds per video (median)")
        speed.set_title(f"{model['model']} {model['width']}x{model['height']}, {model['num_frames']} frames, "
                        f"{model['steps']} steps")
        by_preset: dict[str, list[dict[str, Any]]] = {}
        for r in model["runs"]:
            if r["kind"] == "preset" and r["memory_mode"] == "normal":
                by_preset.setdefault(r["preset"], []).append(r)
        for name, runs in by_preset.items():
            if len(runs) > 1:
                scaling.plot([r["batch_size"] for r in runs], [r["videos_per_gpu_hour"] for r in runs],
                             marker="o", label=name)
        scaling.set_xlabel("batch size")
        scaling.set_ylabel("videos per GPU-hour")
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
