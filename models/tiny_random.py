"""A tiny Stable Video Diffusion pipeline with random weights, for tests and demos.

It uses the real diffusers/transformers classes (so loading, sampling and decoding run the real
code) at sizes that sample a 64x64, 8-frame, 4-step video in well under a second on a laptop CPU.
The configs mirror diffusers' own `get_dummy_components()` for SVD, with two changes: a 4-level VAE
(downsampling by 8, like the real one, so latents stay small) and a CLIP vision tower that accepts
the 224x224 input the pipeline resizes every image to.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from models.errors import ModelError
from models.svd_scheduler import svd_feature_extractor, svd_scheduler

SEED = 0
_EMBED_DIM = 32  # CLIP projection size == UNet cross-attention size
_ADD_TIME_DIM = 32  # per added time id (fps, motion bucket, noise strength)


def _unet() -> UNetSpatioTemporalConditionModel:
    return UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,  # 4 noisy latent channels + 4 image-latent channels
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=_EMBED_DIM,
        num_attention_heads=2,
        addition_time_embed_dim=_ADD_TIME_DIM,
        projection_class_embeddings_input_dim=3 * _ADD_TIME_DIM,
        num_frames=8,
    )


def _vae() -> AutoencoderKLTemporalDecoder:
    # GroupNorm(32) inside the encoder and decoder forces 32 channels per level at least.
    return AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )


def _image_encoder() -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=_EMBED_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=224,
        patch_size=32,
    )
    return CLIPVisionModelWithProjection(config)


def tiny_random_pipeline() -> StableVideoDiffusionPipeline:
    """The tiny pipeline in memory; the same weights on every call."""
    # fork_rng: seeding must not disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = _unet()
        torch.manual_seed(SEED)
        vae = _vae()
        torch.manual_seed(SEED)
        image_encoder = _image_encoder()
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=svd_scheduler(),
        feature_extractor=svd_feature_extractor(),
    )


def build_tiny_random(path: Path) -> Path:
    """Save the tiny random pipeline (safetensors) to `path` and return it.

    The model is written to a sibling temporary directory and renamed into place, so `path`
    either holds a complete model or nothing. Does nothing if `path` already holds a model.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise ModelError(
                f"Cannot build the tiny random model in {path}: it exists, is not empty and holds no "
                "model_index.json. Remove it and try again."
            )
        path.rmdir()
    path.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        tiny_random_pipeline().save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(path)
        except OSError:
            # Another process finished first: its copy is identical, keep it.
            if not (path / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
