"""MP4 and thumbnail encoding, checked with a real ffprobe and Pillow."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import PermanentError
from serving.media import (
    JPEG_CONTENT_TYPE,
    MP4_CONTENT_TYPE,
    encode_mp4,
    make_thumbnail,
    pad_to_even,
)
from tests.media_checks import ffprobe_video, mp4_top_level_boxes


def moving_gradient(count: int, height: int, width: int) -> np.ndarray:
    """Frames of a diagonal gradient that shifts each frame, like a slow pan."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        shift = index * 8
        frames[index, ..., 0] = (xs * 4 + shift) % 256
        frames[index, ..., 1] = (ys * 4 + shift) % 256
        frames[index, ..., 2] = ((xs + ys) * 2) % 256
    return frames


def probe(tmp_path: Path, data: bytes) -> dict[str, object]:
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    return ffprobe_video(path)


def test_content_type_constants() -> None:
    assert MP4_CONTENT_TYPE == "video/mp4"
    assert JPEG_CONTENT_TYPE == "image/jpeg"


@pytest.mark.parametrize(("count", "fps"), [(8, 7), (14, 6), (1, 25)])
def test_encode_mp4_is_h264_yuv420p_with_exact_frames_and_fps(
    tmp_path: Path, count: int, fps: int
) -> None:
    data = encode_mp4(moving_gradient(count, 64, 64), fps)
    info = probe(tmp_path, data)
    assert info["codec_name"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (64, 64)
    assert info["nb_frames"] == count  # decoded, not just what the header says
    assert info["nb_frames_header"] == count
    assert info["r_frame_rate"] == Fraction(fps)
    assert info["avg_frame_rate"] == Fraction(fps)
    assert info["duration"] == pytest.approx(count / fps, abs=0.01)


def test_encode_mp4_puts_moov_before_mdat() -> None:
    boxes = mp4_top_level_boxes(encode_mp4(moving_gradient(8, 64, 64), 7))
    assert boxes[0] == "ftyp"
    assert "moov" in boxes and "mdat" in boxes
    assert boxes.index("moov") < boxes.index("mdat")


def test_encode_mp4_pads_odd_sizes_to_even(tmp_path: Path) -> None:
    data = encode_mp4(moving_gradient(5, 45, 67), 10)
    info = probe(tmp_path, data)
    assert (info["width"], info["height"]) == (68, 46)
    assert info["nb_frames"] == 5
    assert info["pix_fmt"] == "yuv420p"


def test_encoded_video_looks_like_the_frames(tmp_path: Path) -> None:
    """Decode with ffmpeg and compare pixels: the video shows our frames, in order."""
    import subprocess

    import imageio_ffmpeg

    frames = moving_gradient(4, 32, 48)
    path = tmp_path / "video.mp4"
    path.write_bytes(encode_mp4(frames, 8))
    decoded = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path),
         "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    video = np.frombuffer(decoded, dtype=np.uint8).reshape(4, 32, 48, 3)
    error = np.abs(video.astype(np.int16) - frames.astype(np.int16)).mean(axis=(1, 2, 3))
    assert error.max() < 8, error  # lossy, but close to each source frame
    # and each decoded frame is closest to its own source frame, so the order is kept
    for index in range(4):
        distances = [np.abs(video[index].astype(np.int16) - f).mean() for f in frames]
        assert int(np.argmin(distances)) == index


def test_pad_to_even_repeats_edge_pixels() -> None:
    frames = moving_gradient(2, 3, 5)
    padded = pad_to_even(frames)
    assert padded.shape == (2, 4, 6, 3)
    assert np.array_equal(padded[:, :3, :5], frames)
    assert np.array_equal(padded[:, 3, :5], frames[:, 2])
    assert np.array_equal(padded[:, :3, 5], frames[:, :, 4])
    even = moving_gradient(1, 4, 4)
    assert pad_to_even(even) is even


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), dtype=np.float32),  # wrong dtype
        np.zeros((2, 8, 8, 3), dtype=np.int64),
        np.zeros((8, 8, 3), dtype=np.uint8),  # one frame without the N axis
        np.zeros((2, 8, 8, 4), dtype=np.uint8),  # RGBA
        np.zeros((2, 8, 8), dtype=np.uint8),
        np.zeros((0, 8, 8, 3), dtype=np.uint8),  # no frames
        np.zeros((2, 0, 8, 3), dtype=np.uint8),  # empty frames
        [[[[0, 0, 0]]]],  # not an array
    ],
)
def test_encode_mp4_refuses_bad_arrays(frames: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode_mp4(frames, 8)


@pytest.mark.parametrize("fps", [0, -1, 1000, 7.5, True])
def test_encode_mp4_refuses_bad_fps(fps: int) -> None:
    with pytest.raises(ValueError):
        encode_mp4(moving_gradient(2, 8, 8), fps)


def test_encode_mp4_reports_ffmpeg_failure() -> None:
    # An encoder setting x264 rejects makes the real ffmpeg fail.
    with pytest.raises(PermanentError, match="ffmpeg failed") as caught:
        encode_mp4(moving_gradient(2, 8, 8), 8, preset="no-such-preset")
    assert "preset" in caught.value.message.lower()


def test_thumbnail_is_a_jpeg_of_the_right_size() -> None:
    frame = moving_gradient(1, 576, 1024)[0]
    data = make_thumbnail(frame)
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes the whole image
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert image.size == (512, 288)  # longer side 512, aspect kept


def test_thumbnail_never_enlarges_and_keeps_content() -> None:
    frame = np.zeros((40, 60, 3), dtype=np.uint8)
    frame[..., 0] = 200  # red
    image = Image.open(io.BytesIO(make_thumbnail(frame, max_side=512)))
    assert image.size == (60, 40)
    r, g, b = np.asarray(image.convert("RGB")).reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 20 and b < 20


def test_thumbnail_respects_max_side_for_portrait() -> None:
    image = Image.open(io.BytesIO(make_thumbnail(moving_gradient(1, 300, 100)[0], max_side=150)))
    assert image.size == (50, 150)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((8, 8, 3), dtype=np.float32),
        np.zeros((1, 8, 8, 3), dtype=np.uint8),
        np.zeros((8, 8, 4), dtype=np.uint8),
        np.zeros((0, 8, 3), dtype=np.uint8),
    ],
)
def test_thumbnail_refuses_bad_arrays(frame: np.ndarray) -> None:
    with pytest.raises(ValueError):
        make_thumbnail(frame)


def test_mp4_top_level_boxes_parses_sizes() -> None:
    def box(kind: bytes, payload: bytes) -> bytes:
        return (8 + len(payload)).to_bytes(4, "big") + kind + payload

    large = (1).to_bytes(4, "big") + b"mdat" + (16 + 3).to_bytes(8, "big") + b"abc"
    to_end = (0).to_bytes(4, "big") + b"free" + b"rest"
    data = box(b"ftyp", b"isom") + box(b"moov", b"") + large + to_end
    assert mp4_top_level_boxes(data) == ["ftyp", "moov", "mdat", "free"]
    with pytest.raises(ValueError):
        mp4_top_level_boxes(box(b"ftyp", b"isom")[:-1])  # size overruns the data
    with pytest.raises(ValueError):
        mp4_top_level_boxes(b"\x00\x00\x00")  # truncated header
