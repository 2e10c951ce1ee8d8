from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableVideoDiffusionPipeline

import models.loading
from models import ModelError, WeightsNotFound, get_spec
from models.loading import LoadOptions, load_svd_pipeline
from models.tiny_random import build_tiny_random

TINY = get_spec("tiny-random")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_pipe(models_dir: Path) -> StableVideoDiffusionPipeline:
    return load_svd_pipeline(TINY, LoadOptions(models_dir=models_dir, device="cpu"))


def test_tiny_model_is_built_on_disk_and_loaded_by_from_pretrained(
    tiny_pipe: StableVideoDiffusionPipeline, models_dir: Path
) -> None:
    directory = models_dir / "tiny-random"
    for name in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
        "feature_extractor/preprocessor_config.json",
    ):
        assert (directory / name).is_file(), name
    # from_pretrained records where it loaded from; a pipeline built in memory would not.
    assert Path(tiny_pipe.config["_name_or_path"]) == directory
    assert isinstance(tiny_pipe, StableVideoDiffusionPipeline)
    assert tiny_pipe.device.type == "cpu" and tiny_pipe.dtype == torch.float32
    # The atomic build leaves no staging directory behind.
    assert sorted(p.name for p in models_dir.iterdir()) == ["tiny-random"]


def test_second_load_reuses_the_directory(
    tiny_pipe: StableVideoDiffusionPipeline, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = models_dir / "tiny-random" / "model_index.json"
    before = index.stat().st_mtime_ns

    def no_build(path: Path) -> Path:
        raise AssertionError("the tiny model was rebuilt")

    monkeypatch.setattr(models.loading, "build_tiny_random", no_build)
    again = load_svd_pipeline(TINY, LoadOptions(models_dir=models_dir, device="cpu"))
    assert isinstance(again, StableVideoDiffusionPipeline)
    assert index.stat().st_mtime_ns == before


def test_build_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_random(tmp_path / "a")
    second = build_tiny_random(tmp_path / "b")
    for name in ("unet/diffusion_pytorch_model.safetensors", "image_encoder/model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_build_fills_an_empty_directory_but_refuses_a_foreign_one(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert (build_tiny_random(tmp_path / "empty") / "model_index.json").is_file()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        build_tiny_random(tmp_path / "foreign")


def test_offline_real_model_without_weights_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    options = LoadOptions(
        models_dir=tmp_path / "models", offline=True, device="cpu", cache_dir=tmp_path / "hf"
    )
    with pytest.raises(WeightsNotFound) as info:
        load_svd_pipeline(get_spec("svd-xt"), options)
    message = str(info.value)
    assert info.value.model == "svd-xt"
    assert "'svd-xt'" in message
    assert str(tmp_path / "models" / "svd-xt") in message
    assert "svd-serve models download svd-xt" in message
    assert "offline" in message


def test_incomplete_local_directory_is_reported(tmp_path: Path, models_dir: Path, tiny_pipe: object) -> None:
    broken = tmp_path / "svd"
    broken.mkdir()
    (broken / "model_index.json").write_bytes((models_dir / "tiny-random" / "model_index.json").read_bytes())
    with pytest.raises(WeightsNotFound, match="incomplete or unreadable"):
        load_svd_pipeline(get_spec("svd"), LoadOptions(models_dir=tmp_path, offline=True, device="cpu"))


def test_auto_dtype_is_half_on_cuda_and_float_on_cpu(tmp_path: Path) -> None:
    options = LoadOptions(models_dir=tmp_path)
    assert options.resolve_dtype(torch.device("cuda")) == torch.float16
    assert options.resolve_dtype(torch.device("cpu")) == torch.float32
    assert (
        LoadOptions(models_dir=tmp_path, dtype="bfloat16").resolve_dtype(torch.device("cpu"))
        == torch.bfloat16
    )


def test_options_refuse_unknown_device_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`device`"):
        LoadOptions(models_dir=tmp_path, device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dtype`"):
        LoadOptions(models_dir=tmp_path, dtype="int8")  # type: ignore[arg-type]


def test_cuda_requested_without_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="CUDA is not available"):
        LoadOptions(models_dir=tmp_path, device="cuda").resolve_device()
    assert LoadOptions(models_dir=tmp_path).resolve_device() == torch.device("cpu")
