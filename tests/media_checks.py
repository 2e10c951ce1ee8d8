"""Check videos the way a person would: ask a real ffprobe, decode with a real ffmpeg and
Pillow, and read the MP4's box layout.

ffprobe comes from Debian's `ffmpeg` package (imageio-ffmpeg ships ffmpeg only); set
`FFPROBE` to use another binary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np


def ffprobe_exe() -> str:
    """The ffprobe binary to use; fails loudly (no skip) when there is none."""
    exe = os.environ.get("FFPROBE") or shutil.which("ffprobe")
    if not exe:
        raise RuntimeError("ffprobe not found: apt-get install -y --no-install-recommends ffmpeg")
    return exe


def ffprobe_video(path: Path | str) -> dict[str, Any]:
    """Facts about the first video stream of `path`.

    Keys: codec_name, pix_fmt, width, height (ints), nb_frames (frames actually decoded,
    via -count_frames), nb_frames_header (what the container claims), r_frame_rate and
    avg_frame_rate (as Fractions), duration (float seconds, from the container).
    """
    command = [
        ffprobe_exe(),
        "-v", "error",
        "-select_streams", "v:0",
        "-count_frames",
        "-show_entries",
        "stream=codec_name,pix_fmt,width,height,nb_frames,nb_read_frames,"
        "r_frame_rate,avg_frame_rate:format=duration",
        "-of", "json",
        str(path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"ffprobe failed on {path}: {result.stderr.strip()}")
    info = json.loads(result.stdout)
    streams = info.get("streams") or []
    if not streams:
        raise AssertionError(f"ffprobe found no video stream in {path}")
    stream = streams[0]
    return {
        "codec_name": stream["codec_name"],
        "pix_fmt": stream["pix_fmt"],
        "width": int(stream["width"]),
        "height": int(stream["height"]),
        "nb_frames": int(stream["nb_read_frames"]),
        "nb_frames_header": int(stream.get("nb_frames", -1)),
        "r_frame_rate": Fraction(stream["r_frame_rate"]),
        "avg_frame_rate": Fraction(stream["avg_frame_rate"]),
        "duration": float(info.get("format", {}).get("duration", "nan")),
    }


def mp4_top_level_boxes(data: bytes) -> list[str]:
    """The types of the ISO-BMFF top-level boxes in file order, e.g. ['ftyp', 'moov', 'mdat']."""
    boxes: list[str] = []
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset < 8:
            raise ValueError(f"truncated box header at offset {offset}")
        size, raw_type = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:  # 64-bit size follows the type
            if end - offset < 16:
                raise ValueError(f"truncated 64-bit box header at offset {offset}")
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:  # box extends to the end of the file
            size = end - offset
        if size < header or offset + size > end:
            raise ValueError(f"box {raw_type!r} at offset {offset} has a bad size {size}")
        boxes.append(raw_type.decode("latin-1"))
        offset += size
    return boxes


def ffprobe_format(path: Path | str) -> str:
    """The container ffprobe recognises, e.g. 'mov,mp4,m4a,3gp,3g2,mj2', 'matroska,webm', 'gif'."""
    command = [ffprobe_exe(), "-v", "error", "-show_entries", "format=format_name", "-of", "json", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise AssertionError(f"ffprobe failed on {path}: {result.stderr.strip()}")
    return str(json.loads(result.stdout)["format"]["format_name"])


def ffprobe_codec(path: Path | str) -> str:
    """The codec of the first video stream, read from the header only (no decoding)."""
    command = [
        ffprobe_exe(), "-v", "error", "-select_streams", "v:0",
        "-show_entries", "stream=codec_name", "-of", "json", str(path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    streams = json.loads(result.stdout or "{}").get("streams") or []
    if not streams:
        raise AssertionError(f"ffprobe found no video stream in {path}: {result.stderr.strip()}")
    return str(streams[0]["codec_name"])


def decode_rgb_frames(path: Path | str, width: int, height: int) -> np.ndarray:
    """Every frame of `path` as uint8 RGB (N, height, width, 3), decoded by the imageio-ffmpeg
    binary: it decodes animated WebP, which Debian's ffprobe 5.1 cannot."""
    import imageio_ffmpeg

    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path),
        "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"ffmpeg could not decode {path}: {result.stderr.decode(errors='replace')}")
    frame_bytes = width * height * 3
    if len(result.stdout) % frame_bytes:
        raise AssertionError(f"{path} decoded to {len(result.stdout)} bytes, not whole {width}x{height} frames")
    return np.frombuffer(result.stdout, dtype=np.uint8).reshape(-1, height, width, 3)


def animated_image_info(data: bytes) -> dict[str, Any]:
    """What a browser-grade decoder (Pillow: libwebp, its own GIF reader) sees in an animated
    GIF or WebP: format, size (w, h), n_frames, loop (0 = forever), per-frame durations in ms."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        n_frames = int(getattr(image, "n_frames", 1))  # only animated formats define it
        durations = []
        for index in range(n_frames):
            image.seek(index)
            image.load()
            durations.append(int(image.info.get("duration", 0)))
        return {
            "format": image.format,
            "size": image.size,
            "n_frames": n_frames,
            "loop": image.info.get("loop"),
            "durations": durations,
        }


def video_stream_bytes(data: bytes) -> bytes:
    """The first video stream's coded bytes (H.264 Annex B), copied out without decoding: two
    files with equal streams hold the same pictures, bit for bit, whatever their container."""
    import tempfile

    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="stream-bytes-") as tmp:
        path = Path(tmp) / "video.mp4"  # a file, not a pipe: an MP4 with moov at the end needs seeks
        path.write_bytes(data)
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path),
            "-map", "0:v:0", "-c", "copy", "-bsf:v", "h264_mp4toannexb", "-f", "h264", "pipe:1",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, timeout=120, check=False)
    if result.returncode != 0 or not result.stdout:
        raise AssertionError(f"ffmpeg could not copy the video stream: {result.stderr.decode(errors='replace')}")
    return result.stdout
