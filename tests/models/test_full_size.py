"""Full-size random SVD models: the published configs, checked on the meta device (no memory)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import ModelError
from models.full_size import (
    IMAGE_ENCODER_PARAMETERS,
    UNET_PARAMETERS,
    VAE_PARAMETERS,
    empty_full_size_models,
    full_size_random_pipeline,
    image_encoder_config,
    unet_config,
    vae_config,
)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("model", "frames"), [("svd", 14), ("svd-xt", 25), ("svd-xt-1-1", 25)])
def test_configs_give_the_released_parameter_counts_without_memory(model: str, frames: int) -> None:
    unet, vae, image_encoder = empty_full_size_models(model)
    assert {p.device.type for m in (unet, vae, image_encoder) for p in m.parameters()} == {"meta"}
    assert (_parameters(unet), _parameters(vae), _parameters(image_encoder)) == (
        UNET_PARAMETERS,
        VAE_PARAMETERS,
        IMAGE_ENCODER_PARAMETERS,
    )
    assert unet.config.sample_size == 96 and unet.config.num_frames == frames
    assert unet.config.cross_attention_dim == image_encoder.config.projection_dim == 1024
    assert vae.config.scaling_factor == 0.18215 and vae.config.force_upcast


def test_published_component_configs() -> None:
    assert unet_config("svd-xt") == {"sample_size": 96, "num_frames": 25}
    assert vae_config()["block_out_channels"] == (128, 256, 512, 512)
    clip = image_encoder_config()
    assert (clip.hidden_size, clip.intermediate_size, clip.num_hidden_layers, clip.num_attention_heads) == (
        1280,
        5120,
        32,
        16,
    )
    assert (clip.patch_size, clip.image_size, clip.projection_dim, clip.hidden_act) == (14, 224, 1024, "gelu")
    with pytest.raises(ModelError, match="known: svd, svd-xt, svd-xt-1-1"):
        unet_config("svd-9000")


def test_svd_xt_costs_what_the_issue_says_per_step_and_per_decode() -> None:
    # One guided UNet step at 576x1024, 25 frames ~ 160 TFLOP; the VAE decode (chunks of 8) ~ 174.
    unet, vae, _ = empty_full_size_models("svd-xt")
    with torch.device("meta"):
        sample = torch.empty(2, 25, 8, 72, 128)
        context = torch.empty(2, 1, 1024)
        time_ids = torch.empty(2, 3)
        latents = torch.empty(25, 4, 72, 128)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        out = unet(sample, torch.tensor(1.0, device="meta"), context, time_ids, return_dict=False)[0]
    assert out.shape == (2, 25, 4, 72, 128)
    assert 155e12 < counter.get_total_flops() < 165e12

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        for start in range(0, 25, 8):
            chunk = latents[start : start + 8]
            assert vae.decode(chunk, num_frames=chunk.shape[0]).sample.shape == (chunk.shape[0], 3, 576, 1024)
    assert 170e12 < counter.get_total_flops() < 178e12


@pytest.mark.gpu
def test_full_size_random_pipeline_on_cuda() -> None:
    pipe = full_size_random_pipeline("svd", "cuda", torch.float16)
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
    assert _parameters(pipe.unet) == UNET_PARAMETERS
    again = full_size_random_pipeline("svd", "cuda", torch.float16)
    first = next(pipe.unet.parameters())
    assert torch.equal(first, next(again.unet.parameters()))  # same seed, same weights
