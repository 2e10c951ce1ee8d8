"""Stable Video Diffusion at full size with random weights, for benchmarks on offline GPU nodes.

Timing does not depend on weight values, so these give real speed and memory numbers without a
download. The configs are the published ones: the UNet is `UNetSpatioTemporalConditionModel`'s
class defaults with `sample_size=96` (and the checkpoint's frame count), the VAE and the CLIP ViT-H
image encoder as in the released `config.json` files, the Euler scheduler as in
`scheduler_config.json`. The videos are noise.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from models.errors import ModelError
from models.svd_scheduler import svd_feature_extractor, svd_scheduler

# Frames the UNet config of each released checkpoint names (the pipeline's default frame count).
FULL_SIZE_FRAMES: dict[str, int] = {"svd": 14, "svd-xt": 25, "svd-xt-1-1": 25}

# Parameter counts of the released components (what the configs below must reproduce).
UNET_PARAMETERS = 1_524_623_082
VAE_PARAMETERS = 97_742_847
IMAGE_ENCODER_PARAMETERS = 632_076_800


def unet_config(model: str) -> dict[str, Any]:
    """Keyword arguments of the UNet: the class defaults, `sample_size=96`, the model's frames."""
    return {"sample_size": 96, "num_frames": _frames(model)}


def vae_config() -> dict[str, Any]:
    """Keyword arguments of the temporal-decoder VAE."""
    return {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 768,
        "scaling_factor": 0.18215,
        "force_upcast": True,
    }


def image_encoder_config() -> CLIPVisionConfig:
    """OpenCLIP ViT-H/14's vision tower with its 1024-wide projection."""
    return CLIPVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=1024,
        hidden_act="gelu",
    )


def empty_full_size_models(
    model: str,
) -> tuple[UNetSpatioTemporalConditionModel, AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection]:
    """The three networks on the meta device: shapes and parameter counts, no memory, no values.

    Enough to count parameters or FLOPs (`torch.utils.flop_counter`) on a machine without a GPU.
    """
    with init_empty_weights():
        unet = UNetSpatioTemporalConditionModel(**unet_config(model))
        vae = AutoencoderKLTemporalDecoder(**vae_config())
        image_encoder = CLIPVisionModelWithProjection(image_encoder_config())
    return unet, vae, image_encoder


def full_size_random_pipeline(
    model: str, device: torch.device | str, dtype: torch.dtype = torch.float16, seed: int = 0
) -> StableVideoDiffusionPipeline:
    """A full-size pipeline with random weights, initialised directly on `device` (no CPU copy).

    The same `model`, `seed` and device give the same weights, so several copies (one per
    benchmarked configuration) compare like for like. About 9 GiB in float32, 4.5 GiB in float16.
    """
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNetSpatioTemporalConditionModel(**unet_config(model))
        vae = AutoencoderKLTemporalDecoder(**vae_config())
        image_encoder = CLIPVisionModelWithProjection(image_encoder_config())
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=svd_scheduler(),
        feature_extractor=svd_feature_extractor(),
    )
    # A few buffers are built with the legacy `torch.Tensor([...])` constructor, which ignores the
    # default device; one `.to` puts everything in place.
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(model: str) -> int:
    try:
        return FULL_SIZE_FRAMES[model]
    except KeyError:
        raise ModelError(
            f"No full-size config for model {model!r}; known: {', '.join(FULL_SIZE_FRAMES)}."
        ) from None
