"""Video and image encoding for generated frames.

Plain synchronous functions that block on ffmpeg or Pillow: run them in a thread or a CPU
actor, never on an event loop (a blocked loop stops queue-lock renewal, see ARCHITECTURE.md).

Every encoder takes uint8 RGB frames (N, H, W, 3) and an integer fps and returns the file's
bytes. Frame-level edits (`interpolate`, `ping_pong`) return new frame arrays, so every output
of one job shows the same clip.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from serving.errors import PermanentError

MP4_CONTENT_TYPE = "video/mp4"
WEBM_CONTENT_TYPE = "video/webm"
GIF_CONTENT_TYPE = "image/gif"
WEBP_CONTENT_TYPE = "image/webp"
JPEG_CONTENT_TYPE = "image/jpeg"
ZIP_CONTENT_TYPE = "application/zip"

MAX_FPS = 240
ENCODE_TIMEOUT_S = 600.0
_STDERR_TAIL_CHARS = 2000

# Previews are for a page or a chat message, not for viewing at full size.
PREVIEW_MAX_SIDE = 480
# Browsers play GIF frame delays under 2/100 s at 10/100 s, so a faster GIF would crawl.
GIF_MAX_FPS = 50
# minterpolate refuses frames smaller than this; `interpolate` blends them instead.
_MOTION_MIN_SIDE = 32

InterpolationMethod = Literal["motion", "blend"]


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must have dtype uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must have shape (N, H, W, 3), got {frames.shape}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got {frames.shape}")


def _check_fps(fps: int, name: str = "fps") -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or not 1 <= fps <= MAX_FPS:
        raise ValueError(f"{name} must be an integer between 1 and {MAX_FPS}, got {fps!r}")


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


def _raw_input(frames: np.ndarray, fps: int) -> list[str]:
    """ffmpeg arguments that read `frames` as raw RGB from stdin at `fps`."""
    _, height, width, _ = frames.shape
    return [
        _ffmpeg_exe(), "-hide_banner", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size", f"{width}x{height}",
        "-framerate", str(int(fps)), "-i", "pipe:0", "-an",
    ]  # fmt: skip


def _run_ffmpeg(command: list[str], frames: np.ndarray) -> bytes:
    """Run ffmpeg with `frames` on stdin; return its stdout. Failures become PermanentError."""
    # A flat view, not `tobytes()`: the frames are not copied once more for the pipe.
    stdin = np.ascontiguousarray(frames).reshape(-1).data
    try:
        result = subprocess.run(
            command,
            input=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=ENCODE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PermanentError(f"ffmpeg did not finish within {ENCODE_TIMEOUT_S:.0f}s") from exc
    except OSError as exc:
        raise PermanentError(f"could not run ffmpeg: {exc}") from exc
    if result.returncode != 0:
        stderr_tail = result.stderr.decode(errors="replace")[-_STDERR_TAIL_CHARS:].strip()
        raise PermanentError(f"ffmpeg failed with exit code {result.returncode}: {stderr_tail}")
    return result.stdout


def _encode_to_file(frames: np.ndarray, fps: int, output_args: list[str], suffix: str) -> bytes:
    """Encode into a temporary file (muxers such as MP4 +faststart and WebM cues need to seek)."""
    with tempfile.TemporaryDirectory(prefix="svd-encode-") as tmp:
        out_path = Path(tmp) / f"out{suffix}"
        _run_ffmpeg([*_raw_input(frames, fps), *output_args, "-y", str(out_path)], frames)
        try:
            data = out_path.read_bytes()
        except FileNotFoundError:
            data = b""
        if not data:
            raise PermanentError(f"ffmpeg produced no {suffix} output")
        return data


def encode_mp4(frames: np.ndarray, fps: int, *, crf: int = 18, preset: str = "medium") -> bytes:
    """Encode uint8 RGB frames (N, H, W, 3) into an H.264/yuv420p MP4 with `moov` up front.

    The output has exactly N frames at `fps`; odd sizes are padded to even (`pad_to_even`).
    Raises ValueError for a bad array or fps, PermanentError if ffmpeg fails.
    """
    _check_frames(frames)
    _check_fps(fps)
    frames = pad_to_even(frames)
    return _encode_to_file(
        frames,
        fps,
        [
            "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            # Input and output rates are equal; passthrough forbids any frame dup/drop.
            "-fps_mode", "passthrough", "-frames:v", str(frames.shape[0]),
            "-movflags", "+faststart",
        ],
        ".mp4",
    )  # fmt: skip


def encode_webm(frames: np.ndarray, fps: int, *, crf: int = 32, cpu_used: int = 4) -> bytes:
    """Encode frames into a VP9/yuv420p WebM with exactly N frames at `fps`.

    Constant quality (`-b:v 0 -crf`), row multithreading, and `cpu-used 4`: VP9 at its default
    speed takes tens of seconds per clip for a barely visible gain.
    """
    _check_frames(frames)
    _check_fps(fps)
    frames = pad_to_even(frames)
    return _encode_to_file(
        frames,
        fps,
        [
            "-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-b:v", "0", "-crf", str(crf),
            "-row-mt", "1", "-deadline", "good", "-cpu-used", str(cpu_used),
            "-fps_mode", "passthrough", "-frames:v", str(frames.shape[0]),
        ],
        ".webm",
    )  # fmt: skip


def preview_size(width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> tuple[int, int]:
    """(width, height) shrunk so the longer side is at most `max_side`; never enlarged."""
    if max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _scale_filter(frames: np.ndarray, max_side: int) -> str:
    _, height, width, _ = frames.shape
    new_width, new_height = preview_size(width, height, max_side)
    if (new_width, new_height) == (width, height):
        return "null"
    return f"scale={new_width}:{new_height}:flags=lanczos"


def encode_gif(frames: np.ndarray, fps: int, *, max_side: int = PREVIEW_MAX_SIDE) -> bytes:
    """An endlessly looping GIF preview with a palette made for this clip.

    At most `max_side` pixels on the longer side. One 256-colour palette is computed from the
    whole clip (`palettegen`) and applied with ordered dithering, which keeps frame-to-frame
    noise (and so the file size) low. Clips faster than `GIF_MAX_FPS` are resampled to it.
    """
    _check_frames(frames)
    _check_fps(fps)
    scale = _scale_filter(frames, max_side)
    resample = f",fps={GIF_MAX_FPS}" if fps > GIF_MAX_FPS else ""
    graph = (
        f"{scale}{resample},split[a][b];[a]palettegen=stats_mode=diff[p];"
        "[b][p]paletteuse=dither=bayer:bayer_scale=5:diff_mode=rectangle"
    )
    return _encode_to_file(frames, fps, ["-filter_complex", graph, "-loop", "0", "-f", "gif"], ".gif")


def encode_webp(
    frames: np.ndarray, fps: int, *, max_side: int = PREVIEW_MAX_SIDE, quality: int = 75
) -> bytes:
    """An endlessly looping animated WebP preview (lossy), at most `max_side` on the longer side."""
    _check_frames(frames)
    _check_fps(fps)
    return _encode_to_file(
        frames,
        fps,
        [
            "-vf", _scale_filter(frames, max_side), "-c:v", "libwebp_anim", "-lossless", "0",
            "-quality", str(quality), "-pix_fmt", "yuv420p", "-loop", "0",
            "-frames:v", str(frames.shape[0]), "-f", "webp",
        ],
        ".webp",
    )  # fmt: skip


def encode_png_zip(frames: np.ndarray) -> bytes:
    """A ZIP of one PNG per frame, `frame_00000.png` onwards, at the frames' full size.

    Stored, not deflated (PNG is compressed already), with fixed timestamps: the same frames
    always give the same bytes and so the same checksum.
    """
    from PIL import Image

    _check_frames(frames)
    digits = max(5, len(str(frames.shape[0] - 1)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for index, frame in enumerate(frames):
            png = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame)).save(png, format="PNG", compress_level=6)
            info = zipfile.ZipInfo(f"frame_{index:0{digits}d}.png", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, png.getvalue())
    return buffer.getvalue()


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


# Frame-level edits ---------------------------------------------------------------------------


def interpolated_frame_count(num_frames: int, fps: int, target_fps: int) -> int:
    """How many frames `interpolate` returns: one every 1/target_fps seconds from the first
    source frame up to and including the instant of the last one."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    return (num_frames - 1) * target_fps // fps + 1


def interpolate(
    frames: np.ndarray, fps: int, target_fps: int, *, method: InterpolationMethod = "motion"
) -> np.ndarray:
    """Resample a clip from `fps` to a higher `target_fps` with ffmpeg, synthesising the
    in-between frames.

    `motion` is motion-compensated interpolation (`minterpolate`, mci): sharp in-between frames,
    several seconds of CPU per clip. `blend` cross-fades neighbours (`framerate`): ten times
    faster, with ghosting on fast motion. Output frame k shows the instant k/target_fps, so the
    source frames reappear unchanged (up to colour conversion) wherever the instants coincide;
    there are `interpolated_frame_count(N, fps, target_fps)` frames.
    """
    _check_frames(frames)
    _check_fps(fps)
    _check_fps(target_fps, "target_fps")
    if target_fps <= fps:
        raise ValueError(f"target_fps ({target_fps}) must be higher than fps ({fps})")
    if method not in ("motion", "blend"):
        raise ValueError(f"unknown interpolation method {method!r}")
    count, height, width, _ = frames.shape
    wanted = interpolated_frame_count(count, fps, target_fps)
    if count == 1:
        return frames.copy()
    if method == "motion" and min(height, width) >= _MOTION_MIN_SIDE:
        resample = f"minterpolate=fps={target_fps}:mi_mode=mci:mc_mode=aobmc:me_mode=bidir:vsbmc=1"
    else:
        resample = f"framerate=fps={target_fps}"
    # Both filters hold back their last output frames until they see what follows; two cloned
    # frames past the end flush them, and -frames:v then stops exactly at the last source instant.
    command = [
        *_raw_input(frames, fps),
        "-vf", f"tpad=stop_mode=clone:stop=2,{resample}",
        "-frames:v", str(wanted),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
    ]  # fmt: skip
    raw = _run_ffmpeg(command, frames)
    frame_bytes = height * width * 3
    if len(raw) != wanted * frame_bytes:
        raise PermanentError(
            f"interpolation returned {len(raw) / frame_bytes:.2f} frames, expected {wanted}"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(wanted, height, width, 3)


def ping_pong_frame_count(num_frames: int) -> int:
    """How many frames `ping_pong` returns for a clip of `num_frames`."""
    return max(num_frames, 2 * num_frames - 2)


def ping_pong(frames: np.ndarray) -> np.ndarray:
    """The clip forwards then backwards, without repeating either end: 0 1 2 3 2 1.

    Played in a loop it runs 0 1 2 3 2 1 0 1 ... with no frame shown twice in a row at the turns.
    """
    _check_frames(frames)
    return np.concatenate([frames, frames[-2:0:-1]])
