"""Benchmark: the service's own work per job at a real output size, outside the pipeline.

    python scripts/bench_overhead.py                  # SVD-XT's output: 25 frames of 1024x576
    python scripts/bench_overhead.py --frames 14 --runs 5 --json out.json

Issue #5 asks that the time a job spends outside the pipeline (queue, database, dispatch,
post-processing, upload) stay under 5% of the pipeline's time for an SVD-XT job on a GPU. Of
that time only two parts grow with the video: the PostProcessor's work (ffmpeg H.264 encode,
JPEG thumbnail, checksum, store) and moving the decoded frames from the Generator replica to the
PostProcessor through Ray's object store. Neither runs on the GPU, so this machine measures
them for the real output size; `scripts/loadtest.py` measures the rest (per job, independent of
the size) and `scripts/bench_gpu.py` the pipeline's time on a card, the denominator.

The clip is a photo-like texture (1/f spectrum, detail at every scale) under a slow zoom and pan,
like a camera move: an encoder spends about as much on it as on generated video; white noise
would be far slower and a flat illustration far faster, both unlike SVD's output.
Prints a table and, with --json, writes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if importlib.util.find_spec("serving") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from serving.settings import Settings
from serving.types import JobParams, PostProcessRequest
from serving.worker.postprocessing import PostProcessingService

def natural_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like texture: noise with the 1/f amplitude spectrum of natural images, so that the
    encoder meets detail at every scale (a flat illustration would compress to almost nothing)."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    channels = []
    for _ in range(3):
        spectrum = np.fft.rfft2(rng.standard_normal((height, width))) * falloff
        channels.append(np.fft.irfft2(spectrum, s=(height, width)))
    mixed = np.stack(channels, axis=-1) @ np.array([[1.0, 0.8, 0.6], [0.2, 0.5, 0.3], [0.1, 0.2, 0.6]])
    mixed = (mixed - mixed.mean()) / (mixed.std() * 4) + 0.5  # about +-2 sigma over the range
    return Image.fromarray((np.clip(mixed, 0, 1) * 255).astype(np.uint8))


def camera_move(frames: int, width: int, height: int) -> np.ndarray:
    """(frames, height, width, 3) uint8: a photo-like picture under a slow zoom (20%) and pan."""
    photo = natural_image(width * 2, height * 2)
    clip = np.empty((frames, height, width, 3), dtype=np.uint8)
    for index in range(frames):
        t = index / max(frames - 1, 1)
        scale = 1.0 - 0.2 * t
        box_w, box_h = photo.width * scale / 1.2, photo.height * scale / 1.2
        left = (photo.width - box_w) * (0.2 + 0.6 * t)
        top = (photo.height - box_h) * 0.5
        crop = photo.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h))
        clip[index] = np.asarray(crop)
    return clip


def time_postprocess(frames: np.ndarray, fps: int, runs: int, storage_dir: Path) -> dict[str, float]:
    """Median seconds of each PostProcessor stage over `runs` jobs, on local storage (an S3
    upload adds the network's time for `video_mb`)."""
    service = PostProcessingService(Settings(data_dir=storage_dir))
    samples: dict[str, list[float]] = {}
    for run in range(runs):
        # The outputs a job gets by default: the MP4 and its thumbnail.
        request = PostProcessRequest(job_id=f"bench-{run}", owner_id="bench", fps=fps, outputs=JobParams.outputs)
        began = time.perf_counter()
        result = service.process(request, frames)
        samples.setdefault("postprocess_s", []).append(time.perf_counter() - began)
        for name in ("encode_s", "upload_s"):
            samples.setdefault(name, []).append(result.timings[name])
        samples.setdefault("video_mb", []).append(result.objects["mp4"].size / 1e6)
    return {name: round(statistics.median(values), 4) for name, values in samples.items()}


def time_ray_transfer(frames: np.ndarray, runs: int) -> dict[str, float]:
    """Median seconds to hand the frames from one Ray actor to another and get an answer back,
    as the Generator's result reaches the PostProcessor (through the driver-less object store)."""
    import ray

    @ray.remote(num_cpus=0)
    class Producer:
        def __init__(self, frames: np.ndarray) -> None:
            self._frames = frames

        def frames(self) -> np.ndarray:
            return self._frames

    @ray.remote(num_cpus=0)
    class Consumer:
        def consume(self, frames: np.ndarray) -> int:
            return int(frames.shape[0])

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        producer, consumer = Producer.remote(frames), Consumer.remote()
        ray.get(consumer.consume.remote(producer.frames.remote()))  # actors up, first transfer
        samples = []
        for _ in range(runs):
            began = time.perf_counter()
            assert ray.get(consumer.consume.remote(producer.frames.remote())) == frames.shape[0]
            samples.append(time.perf_counter() - began)
        return {"ray_transfer_s": round(statistics.median(samples), 4)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--fps", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray object-store transfer")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    frames = camera_move(args.frames, args.width, args.height)
    with tempfile.TemporaryDirectory() as storage_dir:
        numbers: dict[str, Any] = time_postprocess(frames, args.fps, args.runs, Path(storage_dir))
    if not args.no_ray:
        numbers.update(time_ray_transfer(frames, args.runs))
    numbers["outside_pipeline_s"] = round(numbers["postprocess_s"] + numbers.get("ray_transfer_s", 0.0), 4)
    # The pipeline time at which this is 5%: a slower pipeline keeps the overhead under target.
    numbers["pipeline_s_for_5_percent"] = round(numbers["outside_pipeline_s"] / 0.05, 2)
    numbers["shape"] = {"frames": args.frames, "width": args.width, "height": args.height, "fps": args.fps}
    numbers["frames_mb"] = round(frames.nbytes / 1e6, 1)
    numbers["cpu_count"] = os.cpu_count()

    print(f"clip {args.frames} x {args.width}x{args.height} ({numbers['frames_mb']} MB of frames), "
          f"median of {args.runs} runs, {numbers['cpu_count']} CPUs")
    for name in ("encode_s", "upload_s", "postprocess_s", "ray_transfer_s", "outside_pipeline_s"):
        if name in numbers:
            print(f"  {name:<20} {numbers[name]:8.3f}")
    print(f"  video                {numbers['video_mb']:8.2f} MB")
    print(f"  under 5% of a pipeline of {numbers['pipeline_s_for_5_percent']} s or longer "
          "(plus the size-independent part that scripts/loadtest.py reports)")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return numbers


if __name__ == "__main__":
    main()
