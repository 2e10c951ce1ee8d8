"""Where a step's FLOPs go (meta device, no compute) and the FP8 eligibility behind the `fast` notes."""

from __future__ import annotations

import pytest
import torch

from models.full_size import empty_full_size_models
from pipelines.breakdown import (
    CONVOLUTIONS,
    FEED_FORWARD,
    OTHER,
    PROJECTIONS,
    component_tags,
    count_flops,
    ceilings,
    time_step,
)
from pipelines.denoisers import DeepCacheDenoiser
from pipelines.optimize import fp8_plan
from tests.pipelines.conftest import engine


def _call(module: torch.nn.Module, *args: object) -> object:
    return module(*args)


def _inputs(unet: torch.nn.Module, frames: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    config = unet.config
    return (torch.zeros(1, frames, config.in_channels, height, width), torch.tensor(1.0),
            torch.zeros(1, 1, config.cross_attention_dim), torch.zeros(1, 3))


def test_the_components_add_up_and_the_shallow_pass_is_cheaper() -> None:
    unet = engine().diffusers_pipeline.unet
    denoiser, tags = DeepCacheDenoiser(unet), component_tags(unet)
    args = _inputs(unet, 4, 8, 8)
    full, (out, deep) = count_flops(denoiser, _call, (*args, None), tags)
    shallow, _ = count_flops(denoiser, _call, (*args, deep), tags)
    assert out.device.type == "meta" and next(unet.parameters()).device.type == "cpu"  # weights untouched
    assert set(full.parts) >= {"attention L0", "attention L1", PROJECTIONS, FEED_FORWARD, CONVOLUTIONS}
    assert sum(full.parts.values()) == pytest.approx(full.total)
    # The same count as FlopCounterMode on the real call, but for the attention itself: the CPU's
    # fused attention kernel has no FLOP formula (the meta device's attention has one).
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        denoiser(*args, None)
    assert full.total - full.attention <= counter.get_total_flops() <= full.total
    assert full.attention > 0
    assert 0 < shallow.total < full.total
    assert full.fp8_eligible == 0  # the tiny model has no Linear large enough

    timed = time_step(denoiser, _call, (*args, None), tags)
    assert timed.total > 0 and sum(timed.parts.values()) == pytest.approx(timed.total)
    assert set(timed.parts) <= set(full.parts) | {OTHER}


@pytest.mark.slow
def test_svd_xt_at_576x1024_where_the_flops_go() -> None:
    # The released SVD-XT architecture on the meta device: what bounds `fast` (issue 15's numbers).
    unet, _vae, _encoder = empty_full_size_models("svd-xt")
    denoiser, tags = DeepCacheDenoiser(unet), component_tags(unet)
    args = _inputs(unet, 25, 72, 128)
    full, (_, deep) = count_flops(denoiser, _call, (*args, None), tags)
    shallow, _ = count_flops(denoiser, _call, (*args, deep), tags)
    assert full.total == pytest.approx(79.95e12, rel=1e-3)  # one row (conditional or not), one step
    assert shallow.total / full.total == pytest.approx(0.4165, abs=1e-3)
    assert full.fp8_eligible / full.total == pytest.approx(0.2615, abs=1e-3)
    assert full.share("attention L0") > 0.15 > full.share("attention L1")
    bounds = {c.name: c.unet_speedup for c in ceilings(full, shallow.total / full.total, 3)}
    assert bounds["deepcache every 3"] == pytest.approx(1.637, abs=1e-2)
    assert bounds["fast (fp8 + deepcache every 3)"] < 2  # far from the 4x target: it needs more than these

    plan = fp8_plan(unet)
    assert (plan.linears, len(plan.eligible)) == (464, 222)
    assert plan.flop_share == pytest.approx(0.2615, abs=1e-3)  # 96x96 latents: as many tokens as 72x128


def test_fp8_plan_of_the_tiny_model_converts_nothing() -> None:
    plan = fp8_plan(engine().diffusers_pipeline.unet)
    assert plan.linears > 0 and plan.eligible == () and plan.flop_share == 0
