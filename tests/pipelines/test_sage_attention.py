"""Opt-in 8-bit attention: where it goes, that its wiring is exact, and its fallback off CUDA.

The SageAttention kernels are Triton code for CUDA GPUs; on the CPU the processor's wiring is
checked with SDPA in the kernel's place (what the 8-bit kernel approximates), and the kernel
itself runs in the GPU tests and the benchmark.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from pipelines import BatchItem, preset
from pipelines import sage_attention as sage
from tests.pipelines.conftest import engine, make_params


def test_only_the_spatial_self_attention_gets_the_kernel_and_the_wiring_is_exact() -> None:
    pipeline = engine(preset("reference", attention="sdpa"))
    unet = pipeline.diffusers_pipeline.unet
    params = make_params()
    before = pipeline.run_batch([BatchItem(params)], decode=False)[0].latents
    calls: list[tuple[int, ...]] = []

    def kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(query.shape))
        return F.scaled_dot_product_attention(query, key, value)

    # Down level 0, the mid block, up level 0 (twice); not the temporal nor the cross-attention.
    assert sage.install(unet, kernel) == len(sage.spatial_self_attention(unet)) == 4
    processors = unet.attn_processors
    assert sum(isinstance(p, sage.SageSelfAttnProcessor) for p in processors.values()) == 4
    assert all(".transformer_blocks." in name and name.endswith("attn1.processor")
               for name, p in processors.items() if isinstance(p, sage.SageSelfAttnProcessor))
    assert all(isinstance(p, (sage.SageSelfAttnProcessor, AttnProcessor2_0)) for p in processors.values())
    after = pipeline.run_batch([BatchItem(params)], decode=False)[0].latents
    assert before is not None and after is not None
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # 4 layers x 3 steps; the first: (2 UNet rows x 4 frames, 2 heads, 8x8 tokens, head size 16)
    assert len(calls) == 12 and calls[0] == (8, 2, 64, 16)


def test_off_cuda_the_engine_keeps_its_attention_and_says_why() -> None:
    pipeline = engine(preset("fast", compile_unet=False, compile_vae_decoder=False, sage_attention=True))
    notes = " | ".join(pipeline.engine_notes)
    assert "attention: 8-bit SageAttention skipped, needs CUDA; the attention above is kept" in notes
    assert not any(isinstance(p, sage.SageSelfAttnProcessor)
                   for p in pipeline.diffusers_pipeline.unet.attn_processors.values())
    assert pipeline.generate(make_params(num_frames=2)).std() > 0


def test_unavailable_reasons() -> None:
    assert sage.unavailable_reason(torch.device("cpu"), torch.float16) == "needs CUDA"
    assert "float16 or bfloat16" in (sage.unavailable_reason(torch.device("cuda"), torch.float32) or "")


def test_the_self_check_measures_the_kernel_against_sdpa() -> None:
    exact = sage.self_check(torch.device("cpu"), torch.float32, kernel=F.scaled_dot_product_attention)
    assert exact < 1e-6
    wrong = sage.self_check(torch.device("cpu"), torch.float32, kernel=lambda q, k, v: v)
    assert wrong > sage.SELF_CHECK_MAX_ERROR


@pytest.mark.gpu
def test_sage_attention_on_cuda_is_close_to_sdpa() -> None:
    # The `gpu` extra (and the lease's carry set) installs sageattention: its absence is a failure.
    assert sage.unavailable_reason(torch.device("cuda"), torch.float16) is None
    error = sage.self_check(torch.device("cuda"), torch.float16)
    assert error < sage.SELF_CHECK_MAX_ERROR
