"""Load a Stable Video Diffusion pipeline from the models directory, a tiny random build or the hub."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
import torch
from diffusers import StableVideoDiffusionPipeline
from huggingface_hub.errors import GatedRepoError
from packaging.version import Version

from models.errors import ModelError, WeightsNotFound
from models.specs import ModelSpec
from models.tiny_random import build_tiny_random

log = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "float16", "bfloat16", "float32"]

# diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name warns); we support older releases too.
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class LoadOptions:
    """Where and how to load weights.

    `models_dir/<model name>` is looked at first. `offline` forbids any hub access. `device="auto"`
    picks CUDA when present; `dtype="auto"` is float16 on CUDA and float32 on CPU. `cache_dir` is the
    Hugging Face cache to use (None: the hub's default, i.e. `HF_HOME`/`HF_HUB_CACHE`).
    """

    models_dir: Path
    offline: bool = False
    device: Device = "auto"
    dtype: DType = "auto"
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"`device` must be 'auto', 'cuda' or 'cpu', got {self.device!r}.")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"`dtype` must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}.")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ModelError("Device 'cuda' was requested but CUDA is not available on this machine.")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


def load_svd_pipeline(spec: ModelSpec, options: LoadOptions) -> StableVideoDiffusionPipeline:
    """Load `spec`'s pipeline onto the chosen device, ready to sample.

    Order: `models_dir/<name>` when it holds a `model_index.json`; for random models, build it there
    first; otherwise the Hugging Face cache/hub (cache only when offline). Raises `WeightsNotFound`
    with instructions when the weights cannot be had.
    """
    device = options.resolve_device()
    dtype = options.resolve_dtype(device)
    local_dir = Path(options.models_dir) / spec.name

    # 1. A local copy wins: it is what an operator put there on purpose (or what we built).
    if not _has_model(local_dir) and spec.is_random:
        log.info("building random model %s in %s", spec.name, local_dir)
        build_tiny_random(local_dir)

    # 2. Load through diffusers' own loader, from the directory or from the hub cache.
    if _has_model(local_dir):
        pipe = _from_local(spec, local_dir, dtype)
    else:
        pipe = _from_hub(spec, options, local_dir, dtype)

    # 3. Place it; progress is reported through our own callback, not tqdm.
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _has_model(directory: Path) -> bool:
    return (directory / "model_index.json").is_file()


def _from_local(spec: ModelSpec, directory: Path, dtype: torch.dtype) -> StableVideoDiffusionPipeline:
    variant = _local_variant(directory, dtype)
    try:
        return StableVideoDiffusionPipeline.from_pretrained(
            directory, variant=variant, **{_DTYPE_KWARG: dtype}
        )
    except OSError as exc:
        raise WeightsNotFound(
            spec.name,
            f"The weights of model {spec.name!r} in {directory} are incomplete or unreadable ({exc}). "
            f"Delete that directory and download them again (`svd-serve models download {spec.name}`).",
        ) from exc


def _local_variant(directory: Path, dtype: torch.dtype) -> str | None:
    """'fp16' when the directory holds fp16 weight files and they suit `dtype` (or are all there is)."""
    weights = list((directory / "unet").glob("*.safetensors")) + list((directory / "unet").glob("*.bin"))
    fp16 = [p for p in weights if ".fp16." in p.name]
    full = [p for p in weights if ".fp16." not in p.name]
    if fp16 and (dtype == torch.float16 or not full):
        return "fp16"
    return None


def _from_hub(
    spec: ModelSpec, options: LoadOptions, local_dir: Path, dtype: torch.dtype
) -> StableVideoDiffusionPipeline:
    if spec.hub_id is None:
        raise WeightsNotFound(spec.name, f"Model {spec.name!r} has no hub id and nothing in {local_dir}.")
    # The released checkpoints ship an fp16 variant: half the download and memory. A cache filled
    # without it still works, so fall back to the full-precision files.
    variants = ["fp16", None] if dtype == torch.float16 else [None]
    errors: list[OSError] = []
    for variant in variants:
        try:
            return StableVideoDiffusionPipeline.from_pretrained(
                spec.hub_id,
                variant=variant,
                cache_dir=options.cache_dir,
                local_files_only=options.offline,
                **{_DTYPE_KWARG: dtype},
            )
        except OSError as exc:  # huggingface_hub's not-found, offline and HTTP errors are OSErrors
            errors.append(exc)
    raise WeightsNotFound(spec.name, _not_found_message(spec, options, local_dir, errors[-1])) from errors[-1]


def _not_found_message(spec: ModelSpec, options: LoadOptions, local_dir: Path, cause: OSError) -> str:
    where = "in the Hugging Face cache" if options.offline else "in the Hugging Face cache or on the hub"
    fixes = [
        f"run `svd-serve models download {spec.name}` on a machine with network access",
        f"or copy the diffusers weights of {spec.hub_id} into {local_dir}",
    ]
    if options.offline:
        fixes.append("or turn offline mode off so they can be downloaded")
    if isinstance(cause, GatedRepoError):
        fixes.insert(0, f"accept the license of {spec.hub_id} on huggingface.co and set HF_TOKEN")
    return (
        f"Weights for model {spec.name!r} ({spec.hub_id}) were not found in {local_dir} nor {where}. "
        f"To fix: {'; '.join(fixes)}. Cause: {cause}"
    )
