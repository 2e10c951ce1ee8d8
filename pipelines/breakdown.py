"""Where a UNet step's work and time go, by component, and what each optimization could win from it.

Components: the attention itself (QK^T, softmax, x V) per UNet level, the attention projections
(q, k, v, out), the feed-forward, the resnets and convolutions, and the rest (norms, embeddings,
projections in and out, reshapes). FLOPs are counted on the meta device (`count_flops`: the
module's weights swapped for meta tensors, so any size costs no compute and no memory); time is
measured with module hooks that synchronize the device around every tagged module (`time_step`: one
profiled eager step; a compiled graph has no module boundaries to time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, TemporalResnetBlock, Upsample2D
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PROJECTIONS = "attention projections"
FEED_FORWARD = "feed-forward"
CONVOLUTIONS = "resnets and convs"
OTHER = "other"
# 2x is the best case of each 8-bit path against 16-bit tensor cores (FP8 matmuls double the
# dense rate; SageAttention's int8 QK^T and fp8 PV roughly double FlashAttention-2's).
EIGHT_BIT_SPEEDUP = 2.0


def attention_level(level: int) -> str:
    return f"attention L{level}"


def fp8_eligible(module: nn.Module) -> bool:
    """The Linear layers the FP8 path converts: FP8 GEMMs need dimensions divisible by 16, and
    small projections gain nothing and lose accuracy."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
        and module.in_features * module.out_features >= 1024 * 1024
    )


def component_tags(unet: nn.Module) -> dict[nn.Module, str]:
    """Which component each tagged module of the UNet belongs to (untagged work is `OTHER`).

    Levels count from the outermost (0, full resolution) inwards; the mid block is the deepest.
    """
    levels = len(getattr(unet, "down_blocks", ())) or 1
    tags: dict[nn.Module, str] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            tags[module] = attention_level(_level(name, levels))
            for projection in (module.to_q, module.to_k, module.to_v, module.to_out[0]):
                tags[projection] = PROJECTIONS
        elif isinstance(module, FeedForward):
            tags[module] = FEED_FORWARD
        elif isinstance(module, (ResnetBlock2D, TemporalResnetBlock, Downsample2D, Upsample2D)):
            tags[module] = CONVOLUTIONS
    for name in ("conv_in", "conv_out"):
        if isinstance(getattr(unet, name, None), nn.Module):
            tags[getattr(unet, name)] = CONVOLUTIONS
    return tags


def _level(name: str, levels: int) -> int:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return levels - 1 - int(parts[1])
    return levels - 1  # mid block


@dataclass(frozen=True)
class Breakdown:
    """One pass split by component (`parts` sums to `total`), plus the FP8-eligible Linear share.

    Units are FLOPs (`count_flops`) or seconds (`time_step`).
    """

    total: float
    parts: dict[str, float]
    fp8_eligible: float

    def share(self, component: str) -> float:
        return self.parts.get(component, 0.0) / self.total if self.total > 0 else 0.0

    @property
    def attention(self) -> float:
        """The attention itself (all levels), without its projections."""
        return sum(value for name, value in self.parts.items() if name.startswith("attention L"))

    def as_dict(self, scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
        return {
            "total": round(self.total * scale, digits),
            "parts": {name: round(value * scale, digits) for name, value in self.parts.items()},
            "shares": {name: round(self.share(name), 4) for name in self.parts},
            "fp8_eligible_share": round(self.fp8_eligible / self.total, 4) if self.total > 0 else 0.0,
        }


class _Meter:
    """Attributes a growing reading (a FLOP count, a clock) to the innermost tagged module."""

    def __init__(self, tags: dict[nn.Module, str], eligible: list[nn.Module], read: Callable[[], float]) -> None:
        self._tags = tags
        self._eligible = eligible
        self._read = read
        self._stack: list[list[Any]] = []  # [tag, reading at entry, children's inclusive amount]
        self.parts: dict[str, float] = {}
        self.fp8_eligible = 0.0

    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        for module, tag in self._tags.items():
            handles.append(module.register_forward_pre_hook(lambda m, a, tag=tag: self._enter(tag)))
            handles.append(module.register_forward_hook(lambda m, a, o: self._leave(), always_call=True))
        for module in self._eligible:
            start: list[float] = []
            handles.append(module.register_forward_pre_hook(lambda m, a, s=start: s.append(self._read())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, s=start: self._add_eligible(self._read() - s.pop()), always_call=True
            ))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, tag: str) -> None:
        self._stack.append([tag, self._read(), 0.0])

    def _leave(self) -> None:
        tag, started, children = self._stack.pop()
        inclusive = self._read() - started
        self.parts[tag] = self.parts.get(tag, 0.0) + inclusive - children
        if self._stack:
            self._stack[-1][2] += inclusive

    def _add_eligible(self, amount: float) -> None:
        self.fp8_eligible += amount

    def result(self) -> Breakdown:
        ordered = {name: self.parts[name] for name in sorted(self.parts, key=_component_order) if self.parts[name]}
        return Breakdown(total=sum(self.parts.values()), parts=ordered, fp8_eligible=self.fp8_eligible)


def _component_order(name: str) -> tuple[int, str]:
    order = [PROJECTIONS, FEED_FORWARD, CONVOLUTIONS, OTHER]
    return (order.index(name) + 1, name) if name in order else (0, name)


class _Call(nn.Module):
    """A callable over a module as an `nn.Module`, so that `functional_call` can swap its weights."""

    def __init__(self, module: nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self._call = call

    def forward(self, *args: Any) -> Any:
        return self._call(self.module, *args)


def count_flops(
    module: nn.Module, call: Callable[..., Any], args: tuple[Any, ...], tags: dict[nn.Module, str] | None = None
) -> tuple[Breakdown, Any]:
    """FLOPs of `call(module, *args)` on the meta device, by component, and its (meta) output.

    Floating-point tensors in `args` are moved to the meta device; the module's weights are swapped
    for meta tensors for the call only (the module itself is left as it was).
    """
    wrapper = _Call(module, call)
    state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*wrapper.named_parameters(), *wrapper.named_buffers()]
    }
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    counter = FlopCounterMode(display=False)
    all_tags = {**(tags or {}), wrapper: OTHER}
    meter = _Meter(all_tags, [m for m in module.modules() if fp8_eligible(m)], counter.get_total_flops)
    with torch.inference_mode(), counter, meter.hooks():
        output = torch.func.functional_call(wrapper, state, meta_args, strict=False)
    return meter.result(), output


def time_step(
    module: nn.Module, call: Callable[..., Any], args: tuple[Any, ...], tags: dict[nn.Module, str] | None = None
) -> Breakdown:
    """Wall time of `call(module, *args)` by component, the device synchronized around every tagged
    module. Run it on an eager (uncompiled) module after a warm-up call."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    wrapper = _Call(module, call)
    all_tags = {**(tags or {}), wrapper: OTHER}
    meter = _Meter(all_tags, [m for m in module.modules() if fp8_eligible(m)], clock)
    with torch.inference_mode(), meter.hooks():
        wrapper(*args)
    return meter.result()


@dataclass(frozen=True)
class Ceiling:
    """The most an optimization could speed up a UNet step, from where the step's time goes."""

    name: str
    unet_speedup: float
    assumption: str


def ceilings(step: Breakdown, shallow_fraction: float | None, deepcache_interval: int) -> list[Ceiling]:
    """Amdahl bounds from a step's breakdown (time, or FLOPs as a stand-in for time).

    `shallow_fraction`: a DeepCache shallow pass's cost over a full pass's.
    """
    f = step.fp8_eligible / step.total if step.total else 0.0
    a = step.attention / step.total if step.total else 0.0
    other = step.share(OTHER)
    fp8 = 1 / (1 - f + f / EIGHT_BIT_SPEEDUP)
    sage = 1 / (1 - a + a / EIGHT_BIT_SPEEDUP)
    both = 1 / (1 - f - a + (f + a) / EIGHT_BIT_SPEEDUP)
    result = [
        Ceiling("compile (the 'other' part free)", 1 / max(1 - other, 1e-9),
                "norms, embeddings, reshapes and launch gaps cost nothing; matmuls, convs and attention unchanged"),
        Ceiling("fp8 linears", fp8, f"{f:.0%} of the step in FP8-eligible Linears, run {EIGHT_BIT_SPEEDUP:g}x faster"),
        Ceiling("8-bit attention", sage, f"{a:.0%} of the step in attention, run {EIGHT_BIT_SPEEDUP:g}x faster"),
    ]
    if shallow_fraction is not None and deepcache_interval > 1:
        n = deepcache_interval
        cache = n / (1 + (n - 1) * shallow_fraction)
        result.append(Ceiling(f"deepcache every {n}", cache,
                              f"a shallow pass costs {shallow_fraction:.0%} of a full one"))
        result.append(Ceiling(f"fast (fp8 + deepcache every {n})", cache * fp8, "the two bounds above together"))
        result.append(Ceiling("fast + 8-bit attention", cache * both,
                              "fp8 linears, 8-bit attention and deepcache together"))
    return result
