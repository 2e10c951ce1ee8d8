"""Recognising device faults and giving memory back after them."""

from __future__ import annotations

import gc

import torch

# Allocation failures that do not arrive as torch.OutOfMemoryError (cuDNN/cuBLAS workspaces, older
# code paths re-raising a plain RuntimeError) still say so in their message.
_OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (or other device) out-of-memory errors, whatever their exact class."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_MESSAGES)


def release_memory(device: torch.device) -> None:
    """Hand cached blocks back to the driver after a fault or a cancel.

    Call it outside the `except` block that caught the error: until then the traceback keeps the
    failed frames, and their tensors, alive.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no inf anywhere (one device sync)."""
    return bool(torch.isfinite(tensor).all())
