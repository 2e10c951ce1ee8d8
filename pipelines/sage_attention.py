"""8-bit attention (SageAttention) for the UNet's spatial self-attention, opt-in.

SageAttention (Zhang et al., 2024; `sageattention` on PyPI, Triton kernels) quantizes Q and K to
int8 per block, smoothing K by its mean first, and keeps P x V in 16 bits: about twice
FlashAttention-2's speed at a small, measured fidelity cost (scripts/bench_gpu.py prints it).
Only the spatial self-attention gets it: that is where a step's attention time goes (thousands of
tokens at the outer levels); the temporal attention spans the frames (tens of tokens) and the
cross-attention a single image token, where 8 bits would win nothing.

The kernel is wrapped as a custom op, so `torch.compile` keeps it as one opaque call.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

# The head sizes the kernels exist for (SVD's UNet uses 64 throughout).
HEAD_DIMS = (64, 96, 128)
# Above this relative error against SDPA on random inputs the kernel is not used (int8 Q K^T with
# smoothing lands near 1e-2 on such inputs; a broken build lands near 1).
SELF_CHECK_MAX_ERROR = 0.1

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.library.custom_op("svd_serve::sage_attention", mutates_args=())
def sage_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V with int8 Q K^T; inputs and output (batch, heads, tokens, head_dim)."""
    from sageattention import sageattn

    # sageattn subtracts K's mean in place: give it a copy, the op promises not to mutate.
    out: torch.Tensor = sageattn(query, key.clone(), value, tensor_layout="HND", is_causal=False)
    return out.contiguous()


@sage_attention.register_fake
def _sage_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


class SageSelfAttnProcessor:
    """`AttnProcessor2_0` with another attention kernel for plain self-attention (no mask, no
    cross-attention, no group or spatial norm); anything else goes to `AttnProcessor2_0`."""

    def __init__(self, kernel: Kernel = sage_attention) -> None:
        self._kernel = kernel
        self._fallback = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        plain = (
            encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and attn.spatial_norm is None
            and attn.group_norm is None
        )
        if not plain:
            out: torch.Tensor = self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            return out
        residual = hidden_states
        batch, _, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self._kernel(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def spatial_self_attention(unet: nn.Module) -> list[Attention]:
    """The UNet's spatial self-attention layers (`attn1` of its spatial transformer blocks)."""
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith("attn1") and ".transformer_blocks." in name:
            layers.append(module)
    return layers


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why SageAttention cannot run here, or None when it can."""
    if device.type != "cuda":
        return "needs CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"needs float16 or bfloat16 weights, not {dtype}"
    if importlib.util.find_spec("sageattention") is None:
        return "the sageattention package is not installed (pip install -e '.[gpu]')"
    return None


def self_check(device: torch.device, dtype: torch.dtype, kernel: Kernel = sage_attention) -> float:
    """Relative error of `kernel` against SDPA on random attention inputs; raises if it cannot run."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (2, 5, 1024, 64)
    query, key, value = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    expected = F.scaled_dot_product_attention(query, key, value)
    got = kernel(query, key, value)
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def install(unet: nn.Module, kernel: Kernel = sage_attention) -> int:
    """Give the spatial self-attention layers `kernel`; returns how many were changed (the 8-bit
    kernels exist for some head sizes only: the other layers keep their processor)."""
    changed = 0
    for layer in spatial_self_attention(unet):
        if kernel is sage_attention and layer.inner_dim // layer.heads not in HEAD_DIMS:
            continue
        layer.set_processor(SageSelfAttnProcessor(kernel))
        changed += 1
    return changed
