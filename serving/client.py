"""A small HTTP client of our own API, used by `svd-serve submit` and the demo."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"completed", "error", "canceled"}


class JobFailed(RuntimeError):
    def __init__(self, status: dict[str, Any]) -> None:
        error = status.get("error") or {}
        super().__init__(f"job {status.get('jobId')} ended {status.get('status')}: {error.get('code')} {error.get('message')}")
        self.status = status


@dataclass
class ApiClient:
    base_url: str
    api_key: str | None = None
    timeout_s: float = 30.0

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout_s)

    def submit(self, image: Path, fields: dict[str, str] | None = None) -> dict[str, Any]:
        with self._client() as client, image.open("rb") as fh:
            response = client.post("/api/v1/animate-image", files={"image": (image.name, fh)}, data=fields or {})
        if response.status_code not in (200, 202):
            raise RuntimeError(f"submission refused ({response.status_code}): {response.text}")
        body: dict[str, Any] = response.json()
        return body

    def status(self, job_id: str) -> dict[str, Any]:
        with self._client() as client:
            response = client.get(f"/api/v1/animate-image/status/{job_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait(self, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.5, echo: bool = False) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            status = self.status(job_id)
            line = f"{status['status']} {status.get('stage') or ''} {status['progress']:.0%}"
            if echo and line != last:
                print(f"  {job_id}: {line}", flush=True)
                last = line
            if status["status"] in TERMINAL:
                if status["status"] != "completed":
                    raise JobFailed(status)
                return status
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} did not finish within {timeout_s:.0f} s")

    def download(self, url: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with httpx.stream("GET", url, timeout=self.timeout_s) as response:
            response.raise_for_status()
            with dest.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        return dest
