"""The UNet call of one denoising step: plain, or with DeepCache-style reuse of deep features.

DeepCache (Ma et al., 2023) observes that a UNet's deep features change little between adjacent
steps. `DeepCacheDenoiser` runs the whole UNet on "full" steps and keeps the input of its last up
block; on the steps in between it runs only `conv_in`, the first down block(s) that feed the last up
block's skip connections, and that last up block, with the cached deep features. Both are
`nn.Module`s so the engine can `torch.compile` them; the cache itself lives in the sampler's loop,
outside any compiled graph.
"""

from __future__ import annotations

import torch
from diffusers import UNetSpatioTemporalConditionModel
from torch import nn

DenoiserOutput = tuple[torch.Tensor, torch.Tensor | None]


class PlainDenoiser(nn.Module):
    """The UNet as diffusers calls it; never returns deep features."""

    def __init__(self, unet: UNetSpatioTemporalConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        deep: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        out: torch.Tensor = self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_time_ids=added_time_ids,
            return_dict=False,
        )[0]
        return out, None


class DeepCacheDenoiser(nn.Module):
    """The UNet's forward in two paths: full (returns the deep features too) and shallow (uses them).

    The full path computes exactly what `UNetSpatioTemporalConditionModel.forward` computes.
    """

    def __init__(self, unet: UNetSpatioTemporalConditionModel) -> None:
        super().__init__()
        self.unet = unet
        # The last up block takes the first `skips` residuals: conv_in's and the first down block(s)'.
        self._skips = len(unet.up_blocks[-1].resnets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        deep: torch.Tensor | None = None,
    ) -> DenoiserOutput:
        unet = self.unet
        batch_size, num_frames = sample.shape[:2]
        if any(size % 2**unet.num_upsamplers for size in sample.shape[-2:]):
            raise ValueError("DeepCache needs latent sizes divisible by the UNet's upsampling factor.")

        # 1. time and added-time embeddings, repeated per frame (as in the UNet's forward)
        timesteps = timestep[None] if timestep.ndim == 0 else timestep
        timesteps = timesteps.to(sample.device).expand(batch_size)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype))
        time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch_size, -1)).to(emb.dtype)
        emb = emb + unet.add_embedding(time_embeds)
        emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(
            num_frames, dim=0, output_size=encoder_hidden_states.shape[0] * num_frames
        )
        indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)

        # 2. conv_in, then down blocks: all of them on a full step, only the shallow ones otherwise
        hidden = unet.conv_in(sample.flatten(0, 1))
        residuals: tuple[torch.Tensor, ...] = (hidden,)
        for block in unet.down_blocks:
            if deep is not None and len(residuals) >= self._skips:
                break
            hidden, block_residuals = _down(block, hidden, emb, encoder_hidden_states, indicator)
            residuals += block_residuals

        if deep is None:
            # 3. mid block and every up block but the last: the deep features to cache
            hidden = unet.mid_block(
                hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states,
                image_only_indicator=indicator,
            )
            for block in unet.up_blocks[:-1]:
                skips = residuals[-len(block.resnets):]
                residuals = residuals[: -len(block.resnets)]
                hidden = _up(block, hidden, skips, emb, encoder_hidden_states, indicator)
            deep = hidden
        # 4. the last up block, on fresh or cached deep features
        hidden = _up(
            unet.up_blocks[-1], deep, residuals[: self._skips], emb, encoder_hidden_states, indicator
        )

        # 5. post-process and reshape back to (batch, frames, channels, height, width)
        hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
        return hidden.reshape(batch_size, num_frames, *hidden.shape[1:]), deep


def _down(
    block: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, indicator: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    # Cross-attention blocks take the image embedding; the others do not accept it at all.
    extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
    hidden, residuals = block(hidden_states=hidden, temb=emb, image_only_indicator=indicator, **extra)
    return hidden, residuals


def _up(
    block: nn.Module,
    hidden: torch.Tensor,
    skips: tuple[torch.Tensor, ...],
    emb: torch.Tensor,
    context: torch.Tensor,
    indicator: torch.Tensor,
) -> torch.Tensor:
    extra = {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}
    out: torch.Tensor = block(
        hidden_states=hidden, temb=emb, res_hidden_states_tuple=skips, image_only_indicator=indicator, **extra
    )
    return out
