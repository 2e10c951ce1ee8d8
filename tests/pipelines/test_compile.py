"""torch.compile: warmed size buckets never recompile for a request.

Dynamo decides what to (re)compile, whatever the backend; the test uses the "eager" backend so
that it takes seconds on a CPU (inductor's CPU compile of even the tiny UNet takes minutes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipelines import EngineOptions, SizeBucket
from pipelines.optimize import compiled_graph_count
from tests.pipelines.conftest import engine, make_params


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    torch._dynamo.reset()
    # The engine points inductor at its cache directory through the environment; restore it after.
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


@pytest.mark.slow
def test_a_warmed_bucket_never_recompiles(tmp_path: Path) -> None:
    options = EngineOptions(compile_unet=True, compile_backend="eager", compile_cache_dir=tmp_path / "inductor")
    pipeline = engine(options)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "inductor").resolve())
    bucket = SizeBucket(width=64, height=64, num_frames=2)

    report = pipeline.warm_up([bucket], max_batch_size=1)
    assert report.buckets == (bucket,)
    assert report.graphs_compiled == 2  # UNet batch 1 (unguided) and a dynamic batch >= 2 (guided)
    compiled = compiled_graph_count()

    guided = make_params(num_frames=2, num_inference_steps=2)
    unguided = make_params(num_frames=2, num_inference_steps=2, seed=5, min_guidance_scale=1.0, max_guidance_scale=1.0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = pipeline.generate(guided)
        second = pipeline.generate(unguided)
        again = pipeline.generate(guided)
    assert compiled_graph_count() == compiled
    assert first.shape == second.shape == (2, 64, 64, 3)
    assert (first == again).all()

    # The compiled engine computes what the eager one does.
    eager = engine().generate(guided)
    assert abs(first.astype(int) - eager.astype(int)).max() <= 1


def test_an_unwarmed_size_compiles_and_the_engine_says_so(caplog: pytest.LogCaptureFixture) -> None:
    pipeline = engine(EngineOptions(name="compiled", compile_unet=True, compile_backend="eager"))
    assert pipeline.warm_up([], max_batch_size=1).graphs_compiled == 0  # configured with no buckets
    before = compiled_graph_count()
    with caplog.at_level("WARNING", logger="pipelines.svd"):
        pipeline.generate(make_params(num_frames=3, num_inference_steps=1))
    assert compiled_graph_count() > before
    assert "add its size to the warm-up buckets" in caplog.text


def test_low_vram_leaves_the_unet_eager_and_generates(caplog: pytest.LogCaptureFixture) -> None:
    # low_vram chunks the feed-forward over the batch in Python, which a dynamic-batch graph cannot hold.
    pipeline = engine(EngineOptions(compile_unet=True, compile_backend="eager", memory_mode="low_vram"))
    assert "compile: UNet left eager, low_vram's chunked feed-forward specializes the batch" in pipeline.engine_notes
    before = compiled_graph_count()
    assert pipeline.generate(make_params(num_frames=2, num_inference_steps=2)).std() > 0
    assert compiled_graph_count() == before


@pytest.mark.slow
def test_a_compiled_decoder_decodes_a_bucket_in_its_fixed_chunks_whatever_the_request_asks() -> None:
    pipeline = engine(EngineOptions(compile_vae_decoder=True, compile_backend="eager"))
    bucket = SizeBucket(width=64, height=64, num_frames=10)  # the tiny model's chunk: 8, then 2
    assert pipeline.decode_chunk(10, 3) == pipeline.decode_chunk(10, None) == 8
    assert engine().decode_chunk(10, 3) == 3  # eager: the request's own chunk
    report = pipeline.warm_up([bucket], max_batch_size=1)
    assert report.graphs_compiled == 2  # decoder graphs for 8 and 2 frames
    compiled = compiled_graph_count()
    with torch._dynamo.config.patch(error_on_recompile=True):
        videos = [pipeline.generate(make_params(num_frames=10, num_inference_steps=1, decode_chunk_size=chunk))
                  for chunk in (3, 4, None)]
    assert compiled_graph_count() == compiled
    assert (videos[0] == videos[1]).all() and (videos[1] == videos[2]).all()
