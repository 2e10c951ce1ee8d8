"""Accelerator memory and utilisation of this process's device, for the Generator's gauges."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from serving.metrics import GPU_MEMORY_TOTAL, GPU_MEMORY_USED, GPU_UTILIZATION, MetricBatch


@dataclass(frozen=True)
class DeviceSample:
    """One reading of a device; zeros on CPU, where there is nothing to read."""

    device: str
    memory_used_bytes: float
    memory_total_bytes: float
    utilization_ratio: float


def sample_device(device: str) -> DeviceSample:
    """Read `device` ("cuda:0", "cpu", ...). CUDA memory comes from torch's allocator (what the
    pipeline holds); utilisation from NVML when pynvml is installed, else 0."""
    if not device.startswith("cuda"):
        return DeviceSample(device, 0.0, 0.0, 0.0)
    import torch  # only the Generator calls this, and it has torch loaded already

    index = torch.device(device).index or 0
    used = float(torch.cuda.memory_reserved(index))
    total = float(torch.cuda.get_device_properties(index).total_memory)
    try:
        utilization = float(torch.cuda.utilization(index)) / 100.0  # needs pynvml
    except Exception:  # no NVML (pynvml absent, or a MIG slice): report what we know
        utilization = 0.0
    return DeviceSample(device, used, total, utilization)


def record_device(batch: MetricBatch, device: str) -> None:
    sample = sample_device(device)
    labels = {"node": socket.gethostname(), "device": sample.device}
    batch.set(GPU_MEMORY_USED, labels, sample.memory_used_bytes)
    batch.set(GPU_MEMORY_TOTAL, labels, sample.memory_total_bytes)
    batch.set(GPU_UTILIZATION, labels, sample.utilization_ratio)
