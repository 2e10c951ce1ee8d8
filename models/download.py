"""What `svd-serve models download` fetches: the files diffusers' loader reads, nothing else.

A Stable Video Diffusion repository on the hub also holds single-file checkpoints (`svd.safetensors`,
several GB each), full- and half-precision copies of every component, images and docs. Loading
through `StableVideoDiffusionPipeline.from_pretrained` reads only `model_index.json` and each
component's folder: its JSON configs and the weights of one variant.
"""

from __future__ import annotations

import inspect

from diffusers import StableVideoDiffusionPipeline

# The variant the loader prefers on a GPU (models.loading tries it first); None: full precision.
DEFAULT_VARIANT = "fp16"


def pipeline_components() -> list[str]:
    """The component folders the pipeline is built from (its constructor's arguments)."""
    parameters = inspect.signature(StableVideoDiffusionPipeline.__init__).parameters
    return sorted(name for name in parameters if name != "self")


def download_patterns(variant: str | None = DEFAULT_VARIANT) -> tuple[list[str], list[str]]:
    """(allow_patterns, ignore_patterns) for `huggingface_hub.snapshot_download`.

    Patterns are fnmatch globs on repository paths (`*` crosses `/`). Variant weights are named
    `<weights>.<variant>.safetensors` (or `<weights>.<variant>-0000N-of-0000M.safetensors` when sharded).
    """
    allow = ["model_index.json"]
    for component in pipeline_components():
        allow.append(f"{component}/*.json")  # config, scheduler/preprocessor config, shard index
        if variant is None:
            allow.append(f"{component}/*.safetensors")
        else:
            allow += [f"{component}/*.{variant}.safetensors", f"{component}/*.{variant}-*.safetensors"]
    # Full precision: leave out every variant's copy (two dots in the file name).
    ignore = ["*/*.*.safetensors", "*/*.*-*.safetensors"] if variant is None else []
    return allow, ignore
