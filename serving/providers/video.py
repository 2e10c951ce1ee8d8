"""Decoding a provider's finished video back into frames, so it is post-processed like ours."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from serving.errors import PermanentError

DECODE_TIMEOUT_S = 300.0
# The decoded stream as ffmpeg reports it on stderr: "Stream #0:0: Video: rawvideo (...), rgb24, 64x64, ..., 24 fps"
_OUTPUT_STREAM = re.compile(r"Output #0.*?Stream #0:0.*?Video: rawvideo.*?, (\d+)x(\d+)[^\n]*?, ([\d.]+) fps", re.S)


def decode_video(data: bytes) -> tuple[np.ndarray, float]:
    """uint8 RGB frames (N, H, W, 3) and the frame rate of an encoded video (MP4, WebM), decoded
    by the ffmpeg binary that imageio-ffmpeg ships."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="svd-decode-") as tmp:
        path = Path(tmp) / "provider-output"
        path.write_bytes(data)
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path),
            "-an", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, timeout=DECODE_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PermanentError(
                f"The provider's video could not be decoded: {exc}", code="provider_bad_output"
            ) from exc
    stderr = result.stderr.decode(errors="replace")
    match = _OUTPUT_STREAM.search(stderr)
    if result.returncode != 0 or match is None:
        raise PermanentError(
            f"The provider's video could not be decoded: {stderr[-500:].strip()}", code="provider_bad_output"
        )
    width, height, fps = int(match[1]), int(match[2]), float(match[3])
    frame_bytes = width * height * 3
    count = len(result.stdout) // frame_bytes
    if count == 0:
        raise PermanentError("The provider's video has no frames.", code="provider_bad_output")
    frames = np.frombuffer(result.stdout[: count * frame_bytes], dtype=np.uint8).reshape(count, height, width, 3)
    return frames.copy(), fps
