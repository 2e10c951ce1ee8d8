"""Video and image encoding for generated frames.

Plain synchronous functions that block on ffmpeg or Pillow: run them in a thread or a CPU
actor, never on an event loop (a blocked loop stops queue-lock renewal, see ARCHITECTURE.md).
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from serving.errors import PermanentError

MP4_CONTENT_TYPE = "video/mp4"
JPEG_CONTENT_TYPE = "image/jpeg"

MAX_FPS = 240
ENCODE_TIMEOUT_S = 600.0
_STDERR_TAIL_CHARS = 2000


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must have shape (N, H, W, 3), got {frames.shape}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got {frames.shape}")


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by one row/column that repeats the edge pixels.

    yuv420p subsamples chroma 2x2, so x264 needs even dimensions. Repeating the edge (rather
    than scaling, or padding with black) keeps every original pixel and leaves no visible line;
    the video is then at most one pixel taller/wider than the frames.
    """
    _, height, width, _ = frames.shape
    pad_h, pad_w = height % 2, width % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    exe: str = imageio_ffmpeg.get_ffmpeg_exe()
    return exe


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 18, preset: str = "medium") -> bytes:
    """Encode uint8 RGB frames (N, H, W, 3) into an H.264/yuv420p MP4 with `moov` up front.

    The output has exactly N frames at `fps`; odd sizes are padded to even (`pad_to_even`).
    Raises ValueError for a bad array or fps, PermanentError if ffmpeg fails.
    """
    _check_frames(frames)
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or not 1 <= fps <= MAX_FPS:
        raise ValueError(f"fps must be an integer between 1 and {MAX_FPS}, got {fps!r}")
    frames = np.ascontiguousarray(pad_to_even(frames))
    count, height, width, _ = frames.shape

    with tempfile.TemporaryDirectory(prefix="svd-encode-") as tmp:
        # +faststart rewrites the file to move `moov` before `mdat`, which needs a seekable
        # output: a file, not a pipe.
        out_path = Path(tmp) / "video.mp4"
        command = [
            _ffmpeg_exe(),
            "-hide_banner",
            "-loglevel", "error",
            "-f", "rawvideo",
            "-pix_fmt", "rgb24",
            "-video_size", f"{width}x{height}",
            "-framerate", str(int(fps)),
            "-i", "pipe:0",
            "-an",
            "-c:v", "libx264",
            "-preset", preset,
            "-crf", str(crf),
            "-pix_fmt", "yuv420p",
            # Input and output rates are equal; passthrough forbids any frame dup/drop.
            "-fps_mode", "passthrough",
            "-frames:v", str(count),
            "-movflags", "+faststart",
            "-y", str(out_path),
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command,
                input=frames.tobytes(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=ENCODE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PermanentError(f"ffmpeg did not finish within {ENCODE_TIMEOUT_S:.0f}s") from exc
        except OSError as exc:
            raise PermanentError(f"could not run ffmpeg: {exc}") from exc
        stderr_tail = result.stderr.decode(errors="replace")[-_STDERR_TAIL_CHARS:].strip()
        if result.returncode != 0:
            raise PermanentError(f"ffmpeg failed with exit code {result.returncode}: {stderr_tail}")
        try:
            data = out_path.read_bytes()
        except FileNotFoundError:
            data = b""
        if not data:
            raise PermanentError(f"ffmpeg produced no output: {stderr_tail}")
        return data


def make_thumbnail(frame: np.ndarray, max_side: int = 512, *, quality: int = 85) -> bytes:
    """A JPEG of one uint8 RGB frame (H, W, 3), shrunk so its longer side is at most `max_side`
    (aspect ratio kept, never enlarged)."""
    from PIL import Image

    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise ValueError("frame must be a uint8 numpy array")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] < 1 or frame.shape[1] < 1:
        raise ValueError(f"frame must have shape (H, W, 3), got {frame.shape}")
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    image = Image.fromarray(np.ascontiguousarray(frame))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
