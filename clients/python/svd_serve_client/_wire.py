"""What the sync and async clients share: configuration, how a request is built, when it is
retried, and how a download is verified. Nothing here does I/O on the network."""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any, Union

import httpx

from svd_serve_client._errors import ChecksumMismatch

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1/animate-image"
RETRY_STATUSES = frozenset({429, 502, 503, 504})
NOTHING_DONE_STATUSES = frozenset({429, 503})

try:
    __version__ = version("svd-serve-client")
except PackageNotFoundError:  # imported from a source tree
    __version__ = "0.0.0"

# An image: a path, raw bytes, an open binary file, or an http(s) URL the service fetches.
ImageInput = Union[str, "os.PathLike[str]", bytes, IO[bytes]]

# Python names of the submit options -> the API's camelCase fields.
FIELDS = {
    "prompt": "prompt", "model": "model", "num_frames": "numFrames", "fps": "fps",
    "motion_bucket_id": "motionBucketId", "noise_aug_strength": "noiseAugStrength",
    "num_inference_steps": "numInferenceSteps", "min_guidance_scale": "minGuidanceScale",
    "max_guidance_scale": "maxGuidanceScale", "seed": "seed", "width": "width", "height": "height",
    "outputs": "outputs", "interpolate_fps": "interpolateFps", "loop": "loop", "cache": "cache",
    "priority": "priority", "provider": "provider", "webhook_url": "webhookUrl", "metadata": "metadata",
}


@dataclass(frozen=True)
class Config:
    """Where the service is and how to talk to it; `None` arguments come from the environment."""

    base_url: str
    api_key: str | None
    timeout: float
    max_retries: int
    max_retry_wait_s: float  # a Retry-After longer than this is not waited for: the error is raised

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, timeout: float, max_retries: int,
                max_retry_wait_s: float) -> Config:
        url = base_url or os.environ.get("SVD_SERVE_URL") or DEFAULT_URL
        key = api_key if api_key is not None else os.environ.get("SVD_SERVE_API_KEY") or None
        return cls(url.rstrip("/"), key, timeout, max_retries, max_retry_wait_s)

    def headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"svd-serve-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


def new_idempotency_key() -> str:
    return f"svdc-{uuid.uuid4()}"


def submit_request(image: ImageInput, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `httpx.Client.request` for a submit: JSON with `imageUrl` for a
    URL, multipart with the file otherwise. Unknown options are refused here, before any I/O."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown submit option(s): {', '.join(unknown)}")
    fields = {FIELDS[k]: v for k, v in options.items() if v is not None}
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        return {"json": {"imageUrl": image, **fields}}
    if isinstance(image, bytes):
        name, content = "image", image
    elif hasattr(image, "read"):
        name, content = Path(getattr(image, "name", "image")).name, image.read()
    else:
        path = Path(image)
        name, content = path.name, path.read_bytes()  # FileNotFoundError: the caller's to see
    return {"files": {"image": (name, content)}, "data": {k: _form_value(v) for k, v in fields.items()}}


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def retry_delay(attempt: int, response: httpx.Response | None, config: Config, idempotent: bool = True) -> float | None:
    """Seconds to wait before retry number `attempt + 1`, or None to give up. A transport error
    (no response) and 429/502/503/504 are retried, after `Retry-After` when the answer has one.
    A request that is not idempotent is retried only after an answer saying nothing was done
    (429, 503): a lost connection or a gateway error may hide a success."""
    if attempt >= config.max_retries:
        return None
    statuses = RETRY_STATUSES if idempotent else NOTHING_DONE_STATUSES
    if response is None and not idempotent:
        return None
    if response is not None and response.status_code not in statuses:
        return None
    backoff = min(8.0, 0.5 * float(2**attempt)) * (0.75 + random.random() / 2)
    header = response.headers.get("retry-after") if response is not None else None
    if header is not None:
        try:
            wait = float(header)
        except ValueError:
            return backoff
        return wait if wait <= config.max_retry_wait_s else None
    return backoff


class ChecksumWriter:
    """Writes a download to `dest` through a temporary file, hashing as it goes; `finish()`
    moves it into place only when the SHA-256 matches (a missing checksum is not checked)."""

    def __init__(self, dest: Path, output: str, expected: str | None) -> None:
        self.dest, self.output, self.expected = dest, output, expected
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.partial = dest.with_name(dest.name + ".part")
        self._fh = self.partial.open("wb")
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self._hash.update(chunk)

    def finish(self) -> Path:
        self._fh.close()
        actual = self._hash.hexdigest()
        if self.expected and actual != self.expected.lower():
            self.partial.unlink(missing_ok=True)
            raise ChecksumMismatch(self.output, self.expected, actual)
        self.partial.replace(self.dest)
        return self.dest

    def abort(self) -> None:
        self._fh.close()
        self.partial.unlink(missing_ok=True)


def output_url(info: Any, output: str) -> str:
    url = info.outputs.get(output) or (info.result_url if output == "mp4" else None)
    if not url:
        raise ValueError(f"job {info.id} has no `{output}` output (it has: {', '.join(info.outputs) or 'none'})")
    return str(url)


def download_path(dest: Path, job_id: str, url: str) -> Path:
    if dest.is_dir():
        return dest / f"{job_id}{Path(httpx.URL(url).path).suffix}"
    return dest


def strip_foreign_auth(request: httpx.Request, base_url: str) -> None:
    """Output URLs are presigned, often on another host (S3): our key never goes there."""
    base = httpx.URL(base_url)
    if (request.url.scheme, request.url.host, request.url.port) != (base.scheme, base.host, base.port):
        request.headers.pop("Authorization", None)
