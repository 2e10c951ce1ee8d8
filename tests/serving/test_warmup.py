"""Generator start-up: every configured model and size bucket is loaded and compiled before ready."""

from __future__ import annotations

import io
from pathlib import Path

import pydantic
import pytest
import torch
from PIL import Image

from models.loading import LoadOptions
from models.registry import get_spec
from models.tiny_random import tiny_random_pipeline
from pipelines import EngineOptions, SizeBucket, VideoPipeline
from pipelines.optimize import compiled_graph_count
from serving.settings import Settings
from serving.storage import LocalStorage
from serving.types import GenerationRequest, JobParams
from serving.worker.generation import GenerationService

BUCKET = JobParams(
    model="tiny-random", width=128, height=64, num_frames=5, fps=6, motion_bucket_id=127,
    noise_aug_strength=0.02, num_inference_steps=2, seed=11, min_guidance_scale=1.0, max_guidance_scale=3.0,
)


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    torch._dynamo.reset()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)


@pytest.mark.slow
def test_every_configured_bucket_is_compiled_before_the_first_request(
    tmp_path: Path, redis_url: str, unique_prefix: str
) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, key_prefix=unique_prefix, max_batch_size=1,
                        warmup_buckets=["tiny-random:128x64x5"])
    loaded: list[str] = []

    def load(model: str, options: LoadOptions) -> VideoPipeline:
        # The eager compile backend: dynamo decides what compiles, in seconds on a CPU.
        loaded.append(model)
        return VideoPipeline(tiny_random_pipeline(), get_spec(model),
                             EngineOptions(name="compiled", compile_unet=True, compile_backend="eager"))

    service = GenerationService(settings, loader=load)
    before = compiled_graph_count()
    service.warm_up("tiny-random")
    assert loaded == ["tiny-random"]  # named twice (default and bucket), loaded once
    # Native 64x64x8 and the configured 128x64x5: a graph for one UNet row and one for 2+ rows each.
    assert compiled_graph_count() - before == 4

    buf = io.BytesIO()
    Image.new("RGB", (80, 50), (10, 200, 40)).save(buf, format="PNG")
    LocalStorage(settings.resolved_storage_dir, "http://x", "secret").put("o/j/in.png", buf.getvalue(), "image/png")
    warmed = compiled_graph_count()
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = service.generate(GenerationRequest("j", "o/j/in.png", BUCKET))
    assert result.frames.shape == (5, 64, 128, 3)
    assert compiled_graph_count() == warmed


def test_warmup_buckets_are_checked_when_the_settings_are_built(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, warmup_buckets=["svd-xt:1024x576x25", "svd:768x768x14"]).warmup_buckets
    with pytest.raises(pydantic.ValidationError, match="WIDTHxHEIGHTxFRAMES, for example 1024x576x25, not '1024x576'"):
        Settings(data_dir=tmp_path, warmup_buckets=["svd-xt:1024x576"])
    with pytest.raises(pydantic.ValidationError, match="MODEL:WIDTHxHEIGHTxFRAMES"):
        Settings(data_dir=tmp_path, warmup_buckets=["1024x576x25"])
    assert SizeBucket.parse("1024X576x25") == SizeBucket(1024, 576, 25)
