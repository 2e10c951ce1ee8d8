"""Engine options and presets on the CPU: what each switch does, and what it must not change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.loading import LoadOptions
from pipelines import (
    PRESETS,
    BatchItem,
    EngineConfigError,
    EngineOptions,
    choose_memory_mode,
    load_pipeline,
    preset,
)
from pipelines.denoisers import DeepCacheDenoiser, PlainDenoiser
from pipelines.options import GIB, LOW_VRAM_BELOW_BYTES
from pipelines.sampler import SampleResult
from pipelines.svd import fit_image
from tests.pipelines.conftest import TINY, diffusers_frames, engine, make_params


def _frames(result: SampleResult) -> torch.Tensor:
    assert result.error is None, result.error
    assert result.frames is not None
    return result.frames


def test_the_three_presets_exist_and_differ() -> None:
    assert list(PRESETS) == ["reference", "quality", "fast"]
    reference, quality, fast = (preset(name) for name in PRESETS)
    assert reference == EngineOptions(name="reference")  # diffusers' own behaviour, nothing switched
    assert (quality.dtype, quality.compile_unet, quality.vae_encode_upcast, quality.fp8) == ("float16", True, True, False)
    assert (fast.vae_encode_upcast, quality.deepcache_interval) == (False, 0)
    assert (fast.dtype, fast.fp8, fast.deepcache_interval, fast.compile_vae_decoder) == ("bfloat16", True, 3, True)
    assert preset("quality", compile_unet=False).compile_unet is False
    with pytest.raises(EngineConfigError, match="Unknown engine preset 'turbo'; known presets: reference, quality, fast"):
        preset("turbo")
    with pytest.raises(EngineConfigError, match="deepcache_interval"):
        EngineOptions(deepcache_interval=-1)
    with pytest.raises(EngineConfigError, match="memory_mode"):
        EngineOptions(memory_mode="tiny")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_generates_on_the_cpu(name: str) -> None:
    # Compilation is exercised in test_compile.py; inductor's CPU compile is minutes, not seconds.
    pipeline = engine(preset(name, compile_unet=False, compile_vae_decoder=False))
    video = pipeline.generate(make_params(num_frames=2, num_inference_steps=3))
    assert video.shape == (2, 64, 64, 3) and video.std() > 0
    notes = " | ".join(pipeline.engine_notes)
    if name == "fast":
        assert "fp8: skipped, needs a CUDA GPU" in notes
        assert "deepcache: full UNet every 3 steps" in notes
        assert pipeline.diffusers_pipeline.unet.dtype == torch.bfloat16
    if name != "reference":
        assert "attention: SDPA" in notes and "channels_last" in notes and "cudnn: benchmark skipped" in notes
    assert pipeline.memory_mode == "normal"  # "auto" on a CPU


def test_reference_preset_is_exactly_diffusers() -> None:
    pipeline = engine(preset("reference"))
    diffusers_pipe = pipeline.diffusers_pipeline
    diffusers_pipe.set_progress_bar_config(disable=True)
    params = make_params(min_guidance_scale=1.5, max_guidance_scale=2.5, fps=5, seed=2024)
    ours = _frames(pipeline.run_batch([BatchItem(params)])[0])
    theirs = diffusers_frames(diffusers_pipe, params, fit_image(params.image, params.width, params.height))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_load_pipeline_loads_in_the_engine_precision(tmp_path: Path) -> None:
    pipeline = load_pipeline(TINY, LoadOptions(models_dir=tmp_path, device="cpu"), EngineOptions(dtype="bfloat16"))
    pipe = pipeline.diffusers_pipeline
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.image_encoder.dtype == torch.bfloat16
    assert pipeline.generate(make_params(num_frames=2)).std() > 0


def test_choose_memory_mode() -> None:
    assert choose_memory_mode(80 * GIB) == "normal"
    assert choose_memory_mode(LOW_VRAM_BELOW_BYTES) == "normal"
    assert choose_memory_mode(LOW_VRAM_BELOW_BYTES - 1) == "low_vram"
    assert choose_memory_mode(22 * GIB) == "low_vram"  # a 24 GB card
    assert choose_memory_mode(10 * GIB, threshold_bytes=8 * GIB) == "normal"


def test_low_vram_mode_chunks_feed_forward_and_decode_with_the_same_denoising() -> None:
    normal = engine(EngineOptions(memory_mode="normal"))
    low = engine(EngineOptions(memory_mode="low_vram"))
    assert low.memory_mode == "low_vram"
    assert all(m._chunk_size == 1 for m in low.diffusers_pipeline.unet.modules() if hasattr(m, "_chunk_size"))
    assert "model CPU offload skipped (no CUDA device)" in " | ".join(low.engine_notes)

    decoded: list[int] = []
    real = low.diffusers_pipeline.vae.decode
    low.diffusers_pipeline.vae.decode = lambda z, **kw: (decoded.append(z.shape[0]), real(z, **kw))[1]  # type: ignore[method-assign]
    params = make_params(decode_chunk_size=4)
    ours, theirs = low.run_batch([BatchItem(params)])[0], normal.run_batch([BatchItem(params)])[0]
    assert decoded == [2, 2]  # decode chunks capped at 2
    assert ours.latents is not None and theirs.latents is not None
    torch.testing.assert_close(ours.latents, theirs.latents, rtol=0, atol=1e-5)  # chunking is exact math


def test_deepcache_full_path_is_the_unet_and_shallow_steps_reuse_deep_features() -> None:
    unet = engine().diffusers_pipeline.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, 8, generator=generator)
    context, time_ids = torch.randn(3, 1, 32, generator=generator), torch.randn(3, 3, generator=generator)
    timestep = torch.tensor(1.3)
    with torch.inference_mode():
        plain, none = PlainDenoiser(unet)(sample, timestep, context, time_ids, None)
        full, deep = DeepCacheDenoiser(unet)(sample, timestep, context, time_ids, None)
        same, _ = DeepCacheDenoiser(unet)(sample, timestep, context, time_ids, deep)
        moved, _ = DeepCacheDenoiser(unet)(sample * 0.9, timestep, context, time_ids, deep)
        exact, _ = PlainDenoiser(unet)(sample * 0.9, timestep, context, time_ids, None)
    assert none is None and deep is not None
    torch.testing.assert_close(full, plain, rtol=0, atol=0)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-6)  # same input: cached == fresh deep features
    assert 0 < float((moved - exact).abs().max()) < float(exact.abs().max())  # an approximation, not noise


def test_deepcache_interval_runs_the_full_unet_every_n_steps() -> None:
    params = make_params(num_inference_steps=5)
    plain = engine()
    cached = engine(EngineOptions(deepcache_interval=2))
    exact = _frames(plain.run_batch([BatchItem(params)])[0])
    approx = _frames(cached.run_batch([BatchItem(params)])[0])
    timings = cached.last_timings
    assert (timings.unet_calls, timings.unet_rows_full, timings.unet_rows_cached) == (5, 3 * 2, 2 * 2)
    assert 0 < float((approx - exact).abs().max()) < 0.5
    assert _frames(engine(EngineOptions(deepcache_interval=1)).run_batch([BatchItem(params)])[0]).equal(exact)
