"""A provider's finished video: probed with ffprobe's JSON, remuxed, or decoded back to frames.

ffprobe comes from the system's ffmpeg package (the images install it; imageio-ffmpeg ships
ffmpeg only); decoding and remuxing use imageio-ffmpeg's ffmpeg like the encoders in
`serving.media`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from serving.errors import PermanentError

DECODE_TIMEOUT_S = 300.0
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class VideoInfo:
    """The first video stream of a file, as ffprobe reports it."""

    container: str  # ffprobe's format_name: "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
    codec: str  # "h264", "vp9"
    pix_fmt: str
    width: int
    height: int
    fps: float

    @property
    def is_web_mp4(self) -> bool:
        """Plays wherever our own MP4s play (H.264, yuv420p, in MP4): a remux suffices."""
        return "mp4" in self.container.split(",") and self.codec == "h264" and self.pix_fmt == "yuv420p"


def _bad_output(message: str) -> PermanentError:
    return PermanentError(f"The provider's video could not be read: {message}", code="provider_bad_output")


def _ffprobe() -> str:
    exe = shutil.which("ffprobe")
    if exe is None:
        raise RuntimeError("ffprobe not found: install the ffmpeg package (apt-get install ffmpeg)")
    return exe


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(command, capture_output=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _bad_output(str(exc)) from exc


def _with_file(data: bytes, tmp: str) -> Path:
    path = Path(tmp) / "provider-output"
    path.write_bytes(data)
    return path


def probe_video(data: bytes) -> VideoInfo:
    """Container, codec, size and frame rate of the first video stream (ffprobe `-of json`)."""
    with tempfile.TemporaryDirectory(prefix="svd-probe-") as tmp:
        path = _with_file(data, tmp)
        result = _run(
            [_ffprobe(), "-v", "error", "-select_streams", "v:0", "-of", "json",
             "-show_entries", "stream=codec_name,pix_fmt,width,height,avg_frame_rate,r_frame_rate:format=format_name",
             str(path)],
            PROBE_TIMEOUT_S,
        )  # fmt: skip
    if result.returncode != 0:
        raise _bad_output(result.stderr.decode(errors="replace")[-500:].strip())
    info = json.loads(result.stdout or b"{}")
    streams = info.get("streams") or []
    if not streams:
        raise _bad_output("no video stream")
    stream = streams[0]
    rate = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    if not rate or not stream.get("width") or not stream.get("height"):
        raise _bad_output(f"no size or frame rate in {stream}")
    return VideoInfo(
        container=str(info.get("format", {}).get("format_name", "")),
        codec=str(stream.get("codec_name", "")),
        pix_fmt=str(stream.get("pix_fmt", "")),
        width=int(stream["width"]),
        height=int(stream["height"]),
        fps=float(rate),
    )


def _rate(text: object) -> Fraction | None:
    """ffprobe's "24/1" (or "0/0" when unknown) as a Fraction; None when unknown."""
    if not isinstance(text, str) or "/" not in text:
        return None
    num, _, den = text.partition("/")
    try:
        return Fraction(int(num), int(den)) if int(den) and int(num) else None
    except ValueError:
        return None


def decode_video(data: bytes, info: VideoInfo, *, max_frames: int | None = None) -> np.ndarray:
    """uint8 RGB frames (N, H, W, 3) of an encoded video; the first `max_frames` only if given."""
    limit = ["-frames:v", str(max_frames)] if max_frames is not None else []
    with tempfile.TemporaryDirectory(prefix="svd-decode-") as tmp:
        path = _with_file(data, tmp)
        result = _run(
            [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path),
             "-an", *limit, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
            DECODE_TIMEOUT_S,
        )  # fmt: skip
    if result.returncode != 0:
        raise _bad_output(result.stderr.decode(errors="replace")[-500:].strip())
    frame_bytes = info.width * info.height * 3
    count = len(result.stdout) // frame_bytes
    if count == 0:
        raise _bad_output("no frames")
    frames = np.frombuffer(result.stdout[: count * frame_bytes], dtype=np.uint8)
    return frames.reshape(count, info.height, info.width, 3).copy()


def remux_mp4(data: bytes) -> bytes:
    """The same video stream, packet for packet, in an MP4 with `moov` up front (faststart) and
    no audio (our outputs have none): no decode, no re-encode, no quality lost."""
    with tempfile.TemporaryDirectory(prefix="svd-remux-") as tmp:
        path = _with_file(data, tmp)
        out = Path(tmp) / "video.mp4"
        result = _run(
            [_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(path),
             "-map", "0:v:0", "-c", "copy", "-movflags", "+faststart", "-y", str(out)],
            DECODE_TIMEOUT_S,
        )  # fmt: skip
        if result.returncode != 0 or not out.exists():
            raise _bad_output(result.stderr.decode(errors="replace")[-500:].strip())
        return out.read_bytes()
