"""`svd-serve models download` fetches what `from_pretrained` reads: checked on the real saved
layout of the tiny model (both precisions) next to the other files a hub repository holds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableVideoDiffusionPipeline
from huggingface_hub.utils import filter_repo_objects

from models.download import download_patterns, pipeline_components
from models.tiny_random import tiny_random_pipeline

# Files the released SVD repositories hold besides the diffusers layout.
DECOYS = ("svd.safetensors", "svd_image_decoder.safetensors", "README.md", "LICENSE.md", "images/demo.gif")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository laid out as on the hub: full and fp16 weights of every component, and decoys."""
    root = tmp_path_factory.mktemp("hub-repo")
    pipe = tiny_random_pipeline()
    pipe.save_pretrained(root, safe_serialization=True)
    pipe.to(torch.float16).save_pretrained(root, safe_serialization=True, variant="fp16")
    for name in DECOYS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not needed")
    return root


def repo_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("variant", ["fp16", None])
def test_the_selected_files_load_and_nothing_else_is_fetched(repo: Path, tmp_path: Path, variant: str | None) -> None:
    allow, ignore = download_patterns(variant)
    selected = list(filter_repo_objects(repo_files(repo), allow_patterns=allow, ignore_patterns=ignore))
    for name in selected:  # what snapshot_download would write into local_dir
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, tmp_path / name)

    weights = [name for name in selected if name.endswith(".safetensors")]
    assert {name.split("/")[0] for name in weights} == {"unet", "vae", "image_encoder"}
    assert all((".fp16." in name) == (variant == "fp16") for name in weights), weights
    assert not set(DECOYS) & set(selected)
    assert {"model_index.json", "scheduler/scheduler_config.json", "feature_extractor/preprocessor_config.json"} <= set(selected)

    dtype = torch.float16 if variant == "fp16" else torch.float32
    pipe = StableVideoDiffusionPipeline.from_pretrained(tmp_path, variant=variant, dtype=dtype)
    assert pipe.unet.dtype == dtype


def test_components_are_the_pipelines_own() -> None:
    assert pipeline_components() == ["feature_extractor", "image_encoder", "scheduler", "unet", "vae"]
