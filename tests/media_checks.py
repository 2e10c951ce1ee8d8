"""Check videos the way a person would: ask a real ffprobe, and read the MP4's box layout.

ffprobe comes from Debian's `ffmpeg` package (imageio-ffmpeg ships ffmpeg only); set
`FFPROBE` to use another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any


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
