"""Engine options: every optimization is one switch, grouped into named presets.

Light on purpose (no torch), so settings can name a preset without loading the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipelines.errors import EngineConfigError

Precision = Literal["auto", "float32", "float16", "bfloat16"]
Attention = Literal["default", "sdpa", "xformers"]
MemoryMode = Literal["auto", "normal", "low_vram"]
ResolvedMemoryMode = Literal["normal", "low_vram"]

GIB = 1024**3
# SVD-XT at 1024x576 peaks at about 15 GiB in fp16 with decode chunks of 8; a batch needs more. Below
# this much free memory the low-VRAM mode (CPU offload, chunked feed-forward, decode chunks of 2) wins.
LOW_VRAM_BELOW_BYTES = 30 * GIB
LOW_VRAM_DECODE_CHUNK = 2


@dataclass(frozen=True)
class SizeBucket:
    """A request shape the engine is compiled for at start-up (see `VideoPipeline.warm_up`)."""

    width: int
    height: int
    num_frames: int

    @classmethod
    def parse(cls, text: str) -> SizeBucket:
        """`"1024x576x25"` (width x height x frames) -> `SizeBucket(1024, 576, 25)`."""
        parts = text.strip().lower().split("x")
        if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise EngineConfigError(f"A size bucket is WIDTHxHEIGHTxFRAMES, for example 1024x576x25, not {text!r}.")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))


def parse_warmup_buckets(entries: list[str]) -> dict[str, list[SizeBucket]]:
    """`["svd-xt:1024x576x25", "svd-xt:768x768x14", "svd:1024x576x14"]` -> buckets per model name."""
    buckets: dict[str, list[SizeBucket]] = {}
    for entry in entries:
        model, sep, size = entry.partition(":")
        if not sep or not model.strip():
            raise EngineConfigError(f"A warm-up bucket is MODEL:WIDTHxHEIGHTxFRAMES, for example "
                                    f"svd-xt:1024x576x25, not {entry!r}.")
        bucket = SizeBucket.parse(size)
        listed = buckets.setdefault(model.strip(), [])
        if bucket not in listed:
            listed.append(bucket)
    return buckets


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; the defaults are diffusers' own behaviour (the `reference` preset).

    - `dtype`: UNet and image encoder weights ("auto": as loaded: fp16 on CUDA, fp32 on CPU);
      `vae_dtype` likewise ("auto": same as `dtype`).
    - `vae_encode_upcast`: encode the conditioning image in fp32 when the VAE is fp16 (diffusers'
      `force_upcast`); off, the encode runs in the VAE's dtype and falls back to fp32 only when
      its latents are not finite.
    - `attention`: "default" keeps the loaded processors (diffusers picks SDPA), "sdpa" forces
      `AttnProcessor2_0`, "xformers" uses xformers when importable (else SDPA, noted).
    - `sage_attention`: 8-bit attention (SageAttention, `pipelines.sage_attention`) in the UNet's
      spatial self-attention; CUDA, 16-bit weights and the `sageattention` package only, else the
      attention above is kept, noted. Opt-in: no preset turns it on (`preset("fast", sage_attention=True)`).
    - `channels_last`: NHWC weights for the UNet and VAE convolutions.
    - `cudnn_benchmark`: let cuDNN time its convolution algorithms (CUDA only).
    - `compile_unet` / `compile_vae_decoder`: `torch.compile` with `compile_backend`/`compile_mode`,
      warmed for the configured size buckets; `inductor_tuning` turns on inductor's 1x1-conv-as-matmul
      and coordinate-descent tuning; `compile_cache_dir` persists inductor's cache across restarts.
    - `fp8`: FP8 matmuls through torchao (CUDA compute capability >= 8.9 only, else skipped, noted).
    - `deepcache_interval`: N > 1 runs the full UNet every N steps and only its outermost blocks in
      between, reusing the deep features (DeepCache); 0 or 1 is off.
    - `memory_mode`: "low_vram" offloads idle models to the CPU (CUDA only), chunks the UNet's
      feed-forward and caps VAE decode chunks at 2; "auto" (the default) picks it from the free
      CUDA memory with `choose_memory_mode`, and "normal" on the CPU.
    - `oom_retry` / `nan_fp32_retry`: the fault fallbacks (see `VideoPipeline.generate_batch`).
    """

    name: str = "custom"
    dtype: Precision = "auto"
    vae_dtype: Precision = "auto"
    vae_encode_upcast: bool = True
    attention: Attention = "default"
    sage_attention: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile_unet: bool = False
    compile_vae_decoder: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    inductor_tuning: bool = False
    compile_cache_dir: Path | None = None
    fp8: bool = False
    deepcache_interval: int = 0
    memory_mode: MemoryMode = "auto"
    oom_retry: bool = True
    nan_fp32_retry: bool = True

    def __post_init__(self) -> None:
        if self.deepcache_interval < 0:
            raise EngineConfigError(
                f"`deepcache_interval` must be 0 (off) or more, but is {self.deepcache_interval}."
            )
        for name in ("dtype", "vae_dtype"):
            if getattr(self, name) not in ("auto", "float32", "float16", "bfloat16"):
                raise EngineConfigError(f"`{name}` must be auto, float32, float16 or bfloat16.")
        if self.attention not in ("default", "sdpa", "xformers"):
            raise EngineConfigError(f"`attention` must be default, sdpa or xformers, not {self.attention!r}.")
        if self.memory_mode not in ("auto", "normal", "low_vram"):
            raise EngineConfigError(f"`memory_mode` must be auto, normal or low_vram, not {self.memory_mode!r}.")

    @property
    def uses_deepcache(self) -> bool:
        return self.deepcache_interval > 1

    def replace(self, **changes: object) -> EngineOptions:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, EngineOptions] = {
    # diffusers' StableVideoDiffusionPipeline as shipped: weights as loaded, default attention,
    # fp32 image encode under an fp16 VAE, eager PyTorch.
    "reference": EngineOptions(name="reference"),
    # Same fp16 numerics as the reference (fidelity no worse than its own fp16 error), just faster:
    # compiled UNet, NHWC convolutions tuned by cuDNN, batching. The fp32 image encode stays: one
    # image per request, it costs next to nothing and keeps the conditioning exactly the reference's.
    "quality": EngineOptions(
        name="quality",
        dtype="float16",
        vae_dtype="float16",
        attention="sdpa",
        channels_last=True,
        cudnn_benchmark=True,
        compile_unet=True,
    ),
    # Trades measured fidelity for speed: bf16 with FP8 matmuls on Hopper, DeepCache every 3rd step,
    # compiled VAE decoder, inductor tuning, image encode in bf16 (fp32 only if it overflows). Its
    # fidelity cost is printed by scripts/bench_gpu.py.
    "fast": EngineOptions(
        name="fast",
        dtype="bfloat16",
        vae_dtype="bfloat16",
        vae_encode_upcast=False,
        attention="sdpa",
        channels_last=True,
        cudnn_benchmark=True,
        compile_unet=True,
        compile_vae_decoder=True,
        inductor_tuning=True,
        fp8=True,
        deepcache_interval=3,
    ),
}


def preset(name: str, **overrides: object) -> EngineOptions:
    """The named preset (`reference`, `quality`, `fast`), optionally with some fields changed."""
    try:
        options = PRESETS[name]
    except KeyError:
        raise EngineConfigError(f"Unknown engine preset {name!r}; known presets: {', '.join(PRESETS)}.") from None
    return options.replace(**overrides) if overrides else options


def choose_memory_mode(free_bytes: int, threshold_bytes: int = LOW_VRAM_BELOW_BYTES) -> ResolvedMemoryMode:
    """`low_vram` when the device has less than `threshold_bytes` free, else `normal`."""
    return "low_vram" if free_bytes < threshold_bytes else "normal"
