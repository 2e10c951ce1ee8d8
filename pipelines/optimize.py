"""Apply `EngineOptions` to a loaded diffusers pipeline: precision, attention, memory layout,
FP8, memory mode and `torch.compile`. Each step records what it did, or why it did not, in
`EngineRuntime.notes`, so a benchmark (or an operator) sees exactly which optimizations are live.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import StableVideoDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from pipelines import sage_attention as sage
from pipelines.breakdown import count_flops, fp8_eligible
from pipelines.denoisers import DeepCacheDenoiser, DenoiserOutput, PlainDenoiser
from pipelines.errors import EngineConfigError
from pipelines.options import LOW_VRAM_DECODE_CHUNK, EngineOptions, ResolvedMemoryMode, choose_memory_mode

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0).
_FP8_MIN_CAPABILITY = (8, 9)

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], DenoiserOutput]
Decoder = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class EngineRuntime:
    """What the sampler calls, as configured: the denoiser, the VAE decoder and the memory mode."""

    device: torch.device
    memory_mode: ResolvedMemoryMode
    denoiser: Denoiser
    decode: Decoder
    # The same denoiser uncompiled: the single-request OOM rung runs it with chunked feed-forward,
    # whose per-chunk loop would make a compiled graph specialize its dynamic batch dimension.
    eager_denoiser: Denoiser
    offloaded: bool = False
    compiled: bool = False
    compiled_decoder: bool = False  # one graph per decode chunk length: see `VideoPipeline.decode_chunk`
    notes: list[str] = field(default_factory=list)

    @property
    def max_decode_chunk(self) -> int | None:
        return LOW_VRAM_DECODE_CHUNK if self.memory_mode == "low_vram" else None


def torch_dtype(name: str) -> torch.dtype:
    """`float16` -> `torch.float16`; refuses "auto" (resolve it first)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise EngineConfigError(f"Unknown dtype {name!r}; expected one of {sorted(_DTYPES)}.") from None


def prepare_runtime(pipe: StableVideoDiffusionPipeline, options: EngineOptions) -> EngineRuntime:
    """Apply `options` to `pipe` (in place) and return what the sampler should call."""
    device = pipe.device
    notes: list[str] = []
    _apply_precision(pipe, options, notes)
    _apply_attention(pipe, options, notes)
    _apply_layout(pipe, options, device, notes)
    _apply_fp8(pipe, options, device, notes)
    memory_mode = _resolve_memory_mode(options, device, notes)
    offloaded = _apply_memory_mode(pipe, memory_mode, device, notes)

    module: nn.Module = DeepCacheDenoiser(pipe.unet) if options.uses_deepcache else PlainDenoiser(pipe.unet)
    if options.uses_deepcache:
        notes.append(f"deepcache: full UNet every {options.deepcache_interval} steps, shallow blocks between")
    denoiser: Denoiser = module
    vae = pipe.vae

    def decode(latents: torch.Tensor, num_frames: int) -> torch.Tensor:
        sample: torch.Tensor = vae.decode(latents, num_frames=num_frames).sample
        return sample

    decoder: Decoder = decode
    compiled = False
    # Chunked feed-forward (low_vram) loops over the batch in Python: a compiled UNet would
    # specialize the batch dimension it marks dynamic, so the UNet stays eager then.
    compile_unet = options.compile_unet and memory_mode != "low_vram"
    if (options.compile_unet or options.compile_vae_decoder) and offloaded:
        notes.append("compile: skipped, CPU offload moves the weights on every call")
    elif options.compile_unet or options.compile_vae_decoder:
        _configure_compiler(options, notes)
        if options.compile_unet and not compile_unet:
            notes.append("compile: UNet left eager, low_vram's chunked feed-forward specializes the batch")
        if compile_unet:
            denoiser = CompiledDenoiser(_compile(module, options))
            notes.append(f"compile: UNet with {options.compile_backend} ({options.compile_mode or 'default'})")
        if options.compile_vae_decoder:
            decoder = _compile(decode, options)
            notes.append(f"compile: VAE decode with {options.compile_backend}")
        compiled = compile_unet or options.compile_vae_decoder
    return EngineRuntime(
        device=device,
        memory_mode=memory_mode,
        denoiser=denoiser,
        decode=decoder,
        eager_denoiser=module,
        offloaded=offloaded,
        compiled=compiled,
        compiled_decoder=compiled and options.compile_vae_decoder,
        notes=notes,
    )


class CompiledDenoiser:
    """A compiled denoiser whose batch dimension is dynamic: one graph serves every batch of two
    or more rows (a size-1 batch gets its own graph, as dynamo specializes sizes 0 and 1)."""

    def __init__(self, compiled: Callable[..., DenoiserOutput]) -> None:
        self._compiled = compiled

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        deep: torch.Tensor | None,
    ) -> DenoiserOutput:
        if sample.shape[0] >= 2:
            for tensor in (sample, encoder_hidden_states, added_time_ids):
                torch._dynamo.mark_dynamic(tensor, 0)
            if deep is not None:
                torch._dynamo.mark_dynamic(deep, 0)
        return self._compiled(sample, timestep, encoder_hidden_states, added_time_ids, deep)


def compiled_graph_count() -> int:
    """How many graphs dynamo has compiled in this process (to prove a warmed bucket never recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _apply_precision(pipe: StableVideoDiffusionPipeline, options: EngineOptions, notes: list[str]) -> None:
    if options.dtype != "auto":
        dtype = torch_dtype(options.dtype)
        pipe.unet.to(dtype=dtype)
        pipe.image_encoder.to(dtype=dtype)
    vae_name = options.vae_dtype if options.vae_dtype != "auto" else options.dtype
    if vae_name != "auto":
        pipe.vae.to(dtype=torch_dtype(vae_name))
    notes.append(f"precision: unet {pipe.unet.dtype}, image encoder {pipe.image_encoder.dtype}, vae {pipe.vae.dtype}")


def _apply_attention(pipe: StableVideoDiffusionPipeline, options: EngineOptions, notes: list[str]) -> None:
    if options.attention == "xformers":
        if importlib.util.find_spec("xformers") is not None and pipe.device.type == "cuda":
            pipe.enable_xformers_memory_efficient_attention()
            notes.append("attention: xformers")
        else:
            notes.append("attention: xformers unavailable (not installed or no CUDA), using SDPA")
            pipe.unet.set_attn_processor(AttnProcessor2_0())
            notes.append("attention: SDPA (AttnProcessor2_0)")
    elif options.attention == "sdpa":
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        notes.append("attention: SDPA (AttnProcessor2_0)")
    if options.sage_attention:
        _apply_sage_attention(pipe, notes)


def _apply_sage_attention(pipe: StableVideoDiffusionPipeline, notes: list[str]) -> None:
    reason = sage.unavailable_reason(pipe.device, pipe.unet.dtype)
    if reason is None:
        try:
            error = sage.self_check(pipe.device, pipe.unet.dtype)
        except Exception as exc:  # a kernel that does not build or run on this card/Triton
            reason = f"its kernel failed a self-check ({type(exc).__name__}: {exc})"
        else:
            if not error < sage.SELF_CHECK_MAX_ERROR:
                reason = f"its self-check error against SDPA is {error:.1e}"
    if reason is not None:
        notes.append(f"attention: 8-bit SageAttention skipped, {reason}; the attention above is kept")
        return
    changed = sage.install(pipe.unet)
    notes.append(f"attention: 8-bit SageAttention in {changed} spatial self-attention layers "
                 f"(self-check error {error:.1e} against SDPA)")


def _apply_layout(
    pipe: StableVideoDiffusionPipeline, options: EngineOptions, device: torch.device, notes: list[str]
) -> None:
    if options.channels_last:
        converted = _channels_last(pipe.unet) + _channels_last(pipe.vae)
        notes.append(f"layout: channels_last for {converted} UNet/VAE convolutions")
    if options.cudnn_benchmark:
        if device.type == "cuda":
            # Process-wide: cuDNN times its algorithms once per new convolution shape (at warm-up).
            torch.backends.cudnn.benchmark = True
            notes.append("cudnn: benchmark mode")
        else:
            notes.append("cudnn: benchmark skipped (no CUDA)")


def _channels_last(model: nn.Module) -> int:
    # `model.to(memory_format=...)` refuses SVD's models: their temporal Conv3d weights are 5-D.
    # The 2-D convolutions are where cuDNN's NHWC kernels pay; the 3-D ones get NDHWC likewise.
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
            count += 1
        elif isinstance(module, nn.Conv3d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
            count += 1
    return count


def _apply_fp8(
    pipe: StableVideoDiffusionPipeline, options: EngineOptions, device: torch.device, notes: list[str]
) -> None:
    if not options.fp8:
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < _FP8_MIN_CAPABILITY:
        notes.append("fp8: skipped, needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper)")
        return
    if importlib.util.find_spec("torchao") is None:
        notes.append("fp8: skipped, torchao is not installed (pip install torchao)")
        return
    plan = fp8_plan(pipe.unet)
    if not plan.eligible:
        notes.append(f"fp8: nothing converted, none of the UNet's {plan.linears} Linear layers is eligible "
                     "(both sides divisible by 16, at least 1024x1024)")
        return
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    eligible = set(plan.eligible)
    quantize_(pipe.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: module in eligible)
    # Count what torchao really converted: a converted weight is a tensor subclass.
    converted = sum(type(m.weight) not in (torch.Tensor, nn.Parameter) for m in plan.eligible)
    notes.append(f"fp8: torchao dynamic float8 (per-row) on {converted} of the UNet's {plan.linears} Linear "
                 f"layers, {plan.flop_share:.0%} of a UNet step's FLOPs ({plan.at})")


@dataclass(frozen=True)
class Fp8Plan:
    """The UNet's FP8-eligible Linear layers and their share of a step's FLOPs."""

    linears: int
    eligible: tuple[nn.Module, ...]
    flop_share: float
    at: str  # the input size the share was counted at


def fp8_plan(unet: nn.Module) -> Fp8Plan:
    """Which Linear layers the FP8 path would convert, and their FLOP share at the UNet's own sample
    size and frame count (counted on the meta device: no compute)."""
    linears = [m for m in unet.modules() if isinstance(m, nn.Linear)]
    eligible = tuple(m for m in linears if fp8_eligible(m))
    config = unet.config
    size, frames = int(config.sample_size), int(config.num_frames)
    sample = torch.zeros(1, frames, config.in_channels, size, size, dtype=unet.dtype)
    context = torch.zeros(1, 1, config.cross_attention_dim, dtype=unet.dtype)
    time_ids = torch.zeros(1, 3, dtype=unet.dtype)
    counted, _ = count_flops(PlainDenoiser(unet), _call, (sample, torch.tensor(1.0), context, time_ids))
    share = counted.fp8_eligible / counted.total if counted.total else 0.0
    return Fp8Plan(len(linears), eligible, share, f"{size}x{size} latents, {frames} frames")


def _call(module: nn.Module, *args: Any) -> Any:
    return module(*args)


def _resolve_memory_mode(options: EngineOptions, device: torch.device, notes: list[str]) -> ResolvedMemoryMode:
    if options.memory_mode != "auto":
        return options.memory_mode
    if device.type != "cuda":
        return "normal"
    free, _total = torch.cuda.mem_get_info(device)
    mode = choose_memory_mode(free)
    notes.append(f"memory: {mode} chosen for {free / 1024**3:.1f} GiB free")
    return mode


def _apply_memory_mode(
    pipe: StableVideoDiffusionPipeline, mode: ResolvedMemoryMode, device: torch.device, notes: list[str]
) -> bool:
    if mode == "normal":
        return False
    set_forward_chunking(pipe.unet, enabled=True)
    notes.append(f"memory: low_vram, chunked UNet feed-forward, VAE decode chunks <= {LOW_VRAM_DECODE_CHUNK}")
    if device.type != "cuda":
        notes.append("memory: model CPU offload skipped (no CUDA device)")
        return False
    pipe.enable_model_cpu_offload(device=device)
    notes.append("memory: model CPU offload (accelerate)")
    return True


def set_forward_chunking(unet: nn.Module, enabled: bool) -> None:
    """Run the transformer blocks' feed-forward one image (one frame for temporal blocks) at a time:
    the same numbers, a fraction of the activation peak. diffusers' `enable_forward_chunking()`
    defaults; the model has no `disable_` counterpart, hence this walk."""
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            if enabled:
                module.set_chunk_feed_forward(chunk_size=1, dim=0)
            else:
                module.set_chunk_feed_forward(chunk_size=None)


def _configure_compiler(options: EngineOptions, notes: list[str]) -> None:
    # All process-wide: torch reads the cache directory from the environment when it first needs it.
    if options.compile_cache_dir is not None:
        cache = Path(options.compile_cache_dir).resolve()
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        notes.append(f"compile: inductor cache in {cache}")
    if options.inductor_tuning and options.compile_backend == "inductor":
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = True
        inductor_config.coordinate_descent_tuning = True
        notes.append("compile: inductor 1x1-conv-as-matmul and coordinate-descent tuning")
    # Each size bucket adds a few graphs (batch 1, batch >= 2, cached/full DeepCache paths); dynamo's
    # default limit of 8 would silently fall back to eager after two or three buckets.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def _compile(target: Any, options: EngineOptions) -> Any:
    # Static shapes by default; `CompiledDenoiser` marks only the batch dimension dynamic.
    mode = options.compile_mode if options.compile_backend == "inductor" else None
    return torch.compile(target, backend=options.compile_backend, mode=mode, dynamic=False)
