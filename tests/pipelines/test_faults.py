"""Faults injected at the UNet/VAE call (test doubles of the module call, not of the engine):
the out-of-memory ladder, the float32 decode retry, and never a black video."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput

from pipelines import BatchItem, EngineOptions, NonFiniteOutput, OutOfMemory, VideoPipeline
from pipelines.faults import is_out_of_memory
from pipelines.sampler import SampleResult
from tests.pipelines.conftest import engine, make_params

ATOL = 1e-4


def _oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test double)")


def _wrap_decode(
    pipeline: VideoPipeline, monkeypatch: pytest.MonkeyPatch, fault: Callable[[torch.Tensor], str | None]
) -> list[tuple[int, torch.dtype]]:
    """Replace `vae.decode` by a double that consults `fault(latents)`: "oom" raises, "nan" poisons."""
    vae = pipeline.diffusers_pipeline.vae
    real = vae.decode
    calls: list[tuple[int, torch.dtype]] = []

    def decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> DecoderOutput:
        calls.append((z.shape[0], vae.dtype))
        action = fault(z)
        if action == "oom":
            raise _oom()
        out = real(z, *args, **kwargs)
        if action == "nan":
            return DecoderOutput(sample=torch.full_like(out.sample, float("nan")))
        return out

    monkeypatch.setattr(vae, "decode", decode)
    return calls


def _wrap_unet(
    pipeline: VideoPipeline, monkeypatch: pytest.MonkeyPatch, fault: Callable[[torch.Tensor], str | None]
) -> list[int]:
    unet = pipeline.diffusers_pipeline.unet
    real = unet.forward
    rows: list[int] = []

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows.append(sample.shape[0])
        action = fault(sample)
        if action == "oom":
            raise _oom()
        out = real(sample, *args, **kwargs)
        if action == "nan":
            return (torch.full_like(out[0], float("nan")),)
        return out

    monkeypatch.setattr(unet, "forward", forward)
    return rows


def _frames(result: SampleResult) -> torch.Tensor:
    assert result.error is None, result.error
    assert result.frames is not None
    return result.frames


def test_decode_oom_retries_with_half_the_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine()
    params = make_params(decode_chunk_size=4)
    expected = _frames(pipeline.run_batch([BatchItem(make_params(decode_chunk_size=2))])[0])
    failed = {"done": False}

    def once(z: torch.Tensor) -> str | None:
        if z.shape[0] == 4 and not failed["done"]:
            failed["done"] = True
            return "oom"
        return None

    calls = _wrap_decode(pipeline, monkeypatch, once)
    result = pipeline.run_batch([BatchItem(params)])[0]
    assert [frames for frames, _ in calls] == [4, 2, 2]  # the 4-frame chunk failed; two 2-frame chunks
    torch.testing.assert_close(_frames(result), expected, rtol=0, atol=ATOL)


def test_decode_oom_twice_fails_only_that_request(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine()
    calls = _wrap_decode(pipeline, monkeypatch, lambda z: "oom" if z.shape[0] >= 2 else None)
    big, small = make_params(decode_chunk_size=4), make_params(seed=3, decode_chunk_size=1)
    outcomes = pipeline.generate_batch([BatchItem(big), BatchItem(small)])
    assert isinstance(outcomes[0].error, OutOfMemory)
    assert "4 and then 2 frames" in str(outcomes[0].error)
    assert outcomes[1].ok and outcomes[1].frames is not None and outcomes[1].frames.shape == (4, 64, 64, 3)
    assert [frames for frames, _ in calls] == [4, 2, 1, 1, 1, 1]


def test_unet_oom_splits_the_batch_and_matches_requests_run_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine()
    requests = [make_params(seed=s) for s in (1, 2, 3)]
    alone = [_frames(pipeline.run_batch([BatchItem(p)])[0]) for p in requests]
    failed = {"done": False}

    def once(sample: torch.Tensor) -> str | None:
        if not failed["done"]:
            failed["done"] = True
            return "oom"
        return None

    rows = _wrap_unet(pipeline, monkeypatch, once)
    progress: list[tuple[int, int]] = []
    results = pipeline.run_batch([BatchItem(p, on_progress=lambda d, t: progress.append((d, t))) for p in requests])
    for result, single in zip(results, alone, strict=False):
        torch.testing.assert_close(_frames(result), single, rtol=0, atol=ATOL)
    # 6 rows (3 guided requests) failed; then halves of 2 and 1 requests, 3 steps each.
    assert rows == [6] + [4] * 3 + [2] * 3
    assert progress[-1] == (3, 3)


def test_unet_oom_on_a_single_request_retries_with_chunked_feed_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine()
    params = make_params()
    expected = _frames(pipeline.run_batch([BatchItem(params)])[0])
    unet = pipeline.diffusers_pipeline.unet
    chunked: list[bool] = []
    failed = {"done": False}

    def once(sample: torch.Tensor) -> str | None:
        chunked.append(any(getattr(m, "_chunk_size", None) for m in unet.modules()))
        if not failed["done"]:
            failed["done"] = True
            return "oom"
        return None

    _wrap_unet(pipeline, monkeypatch, once)
    result = pipeline.run_batch([BatchItem(params)])[0]
    torch.testing.assert_close(_frames(result), expected, rtol=0, atol=ATOL)
    assert chunked == [False, True, True, True]
    assert not any(getattr(m, "_chunk_size", None) for m in unet.modules())  # switched off again


def test_unet_oom_on_a_single_request_under_a_compiled_unet(monkeypatch: pytest.MonkeyPatch) -> None:
    # The `quality`/`fast` presets compile the UNet with a dynamic batch dimension; one guided request
    # is a UNet batch of 2. The chunked feed-forward rung must neither crash the compiled graph (it
    # loops over the batch in Python) nor compile anew: it runs the eager UNet.
    torch._dynamo.reset()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    pipeline = engine(EngineOptions(compile_unet=True, compile_backend="eager"))
    params = make_params()
    expected = _frames(engine().run_batch([BatchItem(params)])[0])
    failed = {"done": False}

    def once(sample: torch.Tensor) -> str | None:
        if not failed["done"]:
            failed["done"] = True
            return "oom"
        return None

    rows = _wrap_unet(pipeline, monkeypatch, once)
    result = pipeline.run_batch([BatchItem(params)])[0]
    torch.testing.assert_close(_frames(result), expected, rtol=0, atol=ATOL)
    assert rows[-3:] == [2, 2, 2]  # the retry ran all 3 steps on the guided request's 2 UNet rows
    unet = pipeline.diffusers_pipeline.unet
    assert not any(getattr(m, "_chunk_size", None) for m in unet.modules())  # switched off again
    # And the compiled UNet serves the next request as before.
    torch.testing.assert_close(_frames(pipeline.run_batch([BatchItem(params)])[0]), expected, rtol=0, atol=ATOL)


def test_persistent_oom_is_a_typed_error_and_the_next_batch_runs_normally(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine()
    rows = _wrap_unet(pipeline, monkeypatch, lambda sample: "oom")
    outcomes = pipeline.generate_batch([BatchItem(make_params(seed=s)) for s in (1, 2)])
    assert all(isinstance(o.error, OutOfMemory) for o in outcomes)
    assert "after stepping down" in str(outcomes[0].error)
    assert rows == [4, 2, 2]  # the batch once, then each half once; no endless retrying
    monkeypatch.undo()
    assert pipeline.generate_batch([BatchItem(make_params())])[0].ok


def test_non_finite_decode_is_retried_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine(EngineOptions(vae_dtype="bfloat16"))
    calls = _wrap_decode(pipeline, monkeypatch, lambda z: "nan" if z.dtype == torch.bfloat16 else None)
    outcome = pipeline.generate_batch([BatchItem(make_params(decode_chunk_size=4))])[0]
    assert outcome.ok and outcome.frames is not None and outcome.frames.std() > 0
    assert calls == [(4, torch.bfloat16), (4, torch.float32)]
    assert pipeline.diffusers_pipeline.vae.dtype == torch.bfloat16  # back to its configured precision


def test_non_finite_in_float32_too_is_refused_never_a_black_video(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine(EngineOptions(vae_dtype="bfloat16"))
    _wrap_decode(pipeline, monkeypatch, lambda z: "nan")
    outcome = pipeline.generate_batch([BatchItem(make_params())])[0]
    assert isinstance(outcome.error, NonFiniteOutput)
    assert "also after a float32 retry" in str(outcome.error)
    with pytest.raises(NonFiniteOutput, match="refusing to deliver a black video"):
        pipeline.generate(make_params())


def test_non_finite_latents_fail_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine()
    _wrap_unet(pipeline, monkeypatch, lambda sample: "nan")
    calls = _wrap_decode(pipeline, monkeypatch, lambda z: None)
    outcome = pipeline.generate_batch([BatchItem(make_params())])[0]
    assert isinstance(outcome.error, NonFiniteOutput) and "UNet" in str(outcome.error)
    assert calls == []


def test_non_finite_image_latents_are_re_encoded_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = engine(EngineOptions(vae_dtype="bfloat16", vae_encode_upcast=False))
    vae = pipeline.diffusers_pipeline.vae
    real = vae.encode
    dtypes: list[torch.dtype] = []

    def encode(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        dtypes.append(vae.dtype)
        out = real(x, *args, **kwargs)
        if vae.dtype != torch.float32:
            out.latent_dist.mean.fill_(float("nan"))
        return out

    monkeypatch.setattr(vae, "encode", encode)
    result = pipeline.run_batch([BatchItem(make_params())], decode=False)[0]
    assert result.error is None and result.latents is not None
    assert bool(torch.isfinite(result.latents).all())
    assert dtypes == [torch.bfloat16, torch.float32]


def test_out_of_memory_is_recognised_by_type_and_by_message() -> None:
    assert is_out_of_memory(_oom())
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
