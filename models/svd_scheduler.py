"""The sampler configuration every released SVD checkpoint ships, shared by the random builds."""

from __future__ import annotations

from diffusers import EulerDiscreteScheduler
from transformers import CLIPImageProcessor


def svd_scheduler() -> EulerDiscreteScheduler:
    """Euler, scaled_linear 0.00085-0.012, v-prediction, Karras sigmas 0.002-700, leading spacing,
    continuous timesteps, steps_offset 1: `scheduler_config.json` of stabilityai/stable-video-diffusion-img2vid(-xt)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        trained_betas=None,
        use_karras_sigmas=True,
    )


def svd_feature_extractor() -> CLIPImageProcessor:
    """CLIP preprocessing at 224x224 (the pipeline resizes and normalizes images itself)."""
    return CLIPImageProcessor(crop_size=224, size=224)
