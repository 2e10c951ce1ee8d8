"""MP4 and thumbnail encoding, checked with a real ffprobe and Pillow."""

from __future__ import annotations

import io
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import PermanentError
from serving.media import (
    GIF_CONTENT_TYPE,
    GIF_MAX_FPS,
    JPEG_CONTENT_TYPE,
    MP4_CONTENT_TYPE,
    WEBM_CONTENT_TYPE,
    WEBP_CONTENT_TYPE,
    ZIP_CONTENT_TYPE,
    encode_gif,
    encode_mp4,
    encode_png_zip,
    encode_webm,
    encode_webp,
    interpolate,
    interpolated_frame_count,
    make_thumbnail,
    pad_to_even,
    ping_pong,
    ping_pong_frame_count,
    preview_size,
)
from tests.media_checks import (
    animated_image_info,
    decode_rgb_frames,
    ffprobe_codec,
    ffprobe_format,
    ffprobe_video,
    mp4_top_level_boxes,
)


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
    assert WEBM_CONTENT_TYPE == "video/webm"
    assert GIF_CONTENT_TYPE == "image/gif"
    assert WEBP_CONTENT_TYPE == "image/webp"
    assert ZIP_CONTENT_TYPE == "application/zip"


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


# WebM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "fps"), [(8, 7), (14, 6), (1, 25)])
def test_encode_webm_is_vp9_yuv420p_with_exact_frames_and_fps(tmp_path: Path, count: int, fps: int) -> None:
    path = tmp_path / "video.webm"
    path.write_bytes(encode_webm(moving_gradient(count, 64, 96), fps))
    info = ffprobe_video(path)
    assert ffprobe_format(path) == "matroska,webm"
    assert info["codec_name"] == "vp9"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (96, 64)
    assert info["nb_frames"] == count
    assert info["r_frame_rate"] == Fraction(fps)
    assert info["duration"] == pytest.approx(count / fps, abs=0.01)


def test_encode_webm_pads_odd_sizes_and_looks_like_the_frames(tmp_path: Path) -> None:
    frames = moving_gradient(3, 45, 67)
    path = tmp_path / "video.webm"
    path.write_bytes(encode_webm(frames, 10, crf=10))
    decoded = decode_rgb_frames(path, 68, 46)
    assert decoded.shape == (3, 46, 68, 3)
    error = np.abs(decoded[:, :45, :67].astype(np.int16) - frames.astype(np.int16)).mean()
    assert error < 10


# GIF and WebP previews -----------------------------------------------------------------------


def test_preview_size_shrinks_the_longer_side_and_never_enlarges() -> None:
    assert preview_size(1024, 576, 480) == (480, 270)
    assert preview_size(576, 1024, 480) == (270, 480)
    assert preview_size(300, 200, 480) == (300, 200)
    assert preview_size(1000, 1, 480) == (480, 1)  # never a zero side
    with pytest.raises(ValueError):
        preview_size(10, 10, 0)


def test_encode_gif_is_an_endless_preview_of_every_frame(tmp_path: Path) -> None:
    data = encode_gif(moving_gradient(14, 576, 1024), 7)
    path = tmp_path / "preview.gif"
    path.write_bytes(data)
    assert ffprobe_format(path) == "gif"
    info = ffprobe_video(path)
    assert info["codec_name"] == "gif"
    assert (info["width"], info["height"]) == (480, 270)
    assert info["nb_frames"] == 14
    seen = animated_image_info(data)
    assert seen["format"] == "GIF" and seen["size"] == (480, 270) and seen["n_frames"] == 14
    assert seen["loop"] == 0  # forever
    # GIF delays are whole hundredths: each is 1/7 s to the nearest 10 ms, and they add up.
    assert all(abs(ms - 1000 / 7) <= 10 for ms in seen["durations"])
    assert sum(seen["durations"]) == pytest.approx(2000, abs=10)
    assert len(data) < 2_000_000  # a preview, not a full-size video


def test_encode_gif_keeps_its_colours(tmp_path: Path) -> None:
    frames = np.zeros((3, 40, 60, 3), dtype=np.uint8)
    frames[..., 0] = 200  # red
    seen = animated_image_info(encode_gif(frames, 10))
    assert seen["size"] == (60, 40)  # small clips are not enlarged
    path = tmp_path / "preview.gif"
    path.write_bytes(encode_gif(frames, 10))
    r, g, b = decode_rgb_frames(path, 60, 40).reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 20 and b < 20


def test_encode_gif_resamples_rates_browsers_would_slow_down() -> None:
    seen = animated_image_info(encode_gif(moving_gradient(60, 32, 32), 60))
    assert seen["n_frames"] == GIF_MAX_FPS  # one second at 50 fps
    assert set(seen["durations"]) == {1000 // GIF_MAX_FPS}


def test_encode_webp_is_an_endless_animated_preview(tmp_path: Path) -> None:
    data = encode_webp(moving_gradient(14, 576, 1024), 7)
    path = tmp_path / "preview.webp"
    path.write_bytes(data)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert ffprobe_codec(path) == "webp"  # Debian's ffprobe 5.1 reads the header only
    seen = animated_image_info(data)
    assert seen["format"] == "WEBP" and seen["size"] == (480, 270) and seen["n_frames"] == 14
    assert seen["loop"] == 0
    assert all(abs(ms - 1000 / 7) <= 1 for ms in seen["durations"])
    assert decode_rgb_frames(path, 480, 270).shape[0] == 14
    assert len(data) < 1_000_000


# Frames ZIP ----------------------------------------------------------------------------------


def test_png_zip_holds_every_frame_losslessly_in_order() -> None:
    frames = moving_gradient(12, 45, 67)
    data = encode_png_zip(frames)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names == [f"frame_{index:05d}.png" for index in range(12)]
        for index, name in enumerate(names):
            image = Image.open(io.BytesIO(archive.read(name)))
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (67, 45)
            assert np.array_equal(np.asarray(image), frames[index])
    assert encode_png_zip(frames) == data  # deterministic, so its checksum is too


# Interpolation and looping -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "fps", "target", "expected"), [(5, 6, 24, 17), (8, 7, 30, 31), (25, 6, 30, 121), (1, 6, 24, 1)]
)
def test_interpolated_frame_count(count: int, fps: int, target: int, expected: int) -> None:
    assert interpolated_frame_count(count, fps, target) == expected


@pytest.mark.parametrize("method", ["motion", "blend"])
def test_interpolation_reaches_the_target_fps(tmp_path: Path, method: str) -> None:
    frames = moving_gradient(8, 64, 96)
    smooth = interpolate(frames, 7, 28, method=method)  # type: ignore[arg-type]
    assert smooth.shape == (interpolated_frame_count(8, 7, 28), 64, 96, 3) == (29, 64, 96, 3)
    # Every fourth frame is the instant of a source frame, which comes back unchanged.
    for index in range(8):
        assert np.abs(smooth[index * 4].astype(np.int16) - frames[index]).max() <= 3
    # The frames in between are new: not a copy of either neighbour.
    between = smooth[2].astype(np.int16)
    assert np.abs(between - frames[0]).mean() > 1 and np.abs(between - frames[1]).mean() > 1

    path = tmp_path / "smooth.mp4"
    path.write_bytes(encode_mp4(smooth, 28))
    info = ffprobe_video(path)
    assert info["nb_frames"] == 29
    assert info["r_frame_rate"] == info["avg_frame_rate"] == Fraction(28)
    # Same clip, played four times as smoothly: it lasts as long as the source did.
    assert info["duration"] == pytest.approx(29 / 28, abs=0.01)


def test_interpolation_of_frames_too_small_for_motion_search_blends() -> None:
    smooth = interpolate(moving_gradient(3, 16, 16), 5, 10)
    assert smooth.shape == (5, 16, 16, 3)


def test_interpolation_refuses_nonsense() -> None:
    frames = moving_gradient(3, 32, 32)
    with pytest.raises(ValueError, match="higher than fps"):
        interpolate(frames, 12, 12)
    with pytest.raises(ValueError, match="method"):
        interpolate(frames, 6, 12, method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        interpolate(frames, 6, 1000)


def test_ping_pong_plays_forwards_then_backwards_without_repeating_the_ends() -> None:
    frames = moving_gradient(4, 8, 8)
    looped = ping_pong(frames)
    order = [int(np.argmin([np.abs(f.astype(np.int16) - s).sum() for s in frames])) for f in looped]
    assert order == [0, 1, 2, 3, 2, 1]
    assert [ping_pong_frame_count(n) for n in (1, 2, 3, 25)] == [1, 2, 4, 48]
    assert [len(ping_pong(moving_gradient(n, 8, 8))) for n in (1, 2, 3, 25)] == [1, 2, 4, 48]


def test_looped_video_doubles_the_frames_minus_the_ends(tmp_path: Path) -> None:
    path = tmp_path / "loop.mp4"
    path.write_bytes(encode_mp4(ping_pong(moving_gradient(14, 64, 64)), 7))
    info = ffprobe_video(path)
    assert info["nb_frames"] == 2 * 14 - 2
    assert info["duration"] == pytest.approx(26 / 7, abs=0.01)
