"""Every Redis key svd-serve writes, in one place. All start with the configured prefix.

- `{prefix}:job:{id}:progress`  hash {step, steps, progress, stage}; written by the Generator
  while it denoises, read by the status endpoint; expires a day after the last write.
- `{prefix}:job:{id}:cancel`    "1" once a cancel was requested; checked every denoising step.
- BullMQ keeps its own keys under `bull:{queue_name}:*` (its format, readable by Node tooling).
"""

from __future__ import annotations

from dataclasses import dataclass

PROGRESS_TTL_S = 24 * 3600
CANCEL_TTL_S = 24 * 3600


@dataclass(frozen=True)
class Keys:
    prefix: str = "svd"

    def progress(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:progress"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"
