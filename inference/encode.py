"""Encode uint8 RGB frames to browser-friendly H.264 MP4 files, and probe them back."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc, Interpolation, VideoReformatter

logger = logging.getLogger(__name__)

DEFAULT_CRF = 20
# At the same CRF a slower preset mostly makes the file smaller, at a large cost in time: on 81
# random 480x832 frames (2 cores) "veryfast" took 2.0 s, "medium" 5.4 s.
DEFAULT_PRESET = "veryfast"
# x264 output depends on its thread count (and the count is written into the stream's
# SEI), so a fixed count keeps files byte-identical across hosts with different CPUs.
DEFAULT_THREADS = 8
# RGB -> yuv420p with swscale's bit-exact C path: its SIMD paths may round differently
# on different CPUs. BT.709 limited range is what browsers assume for untagged HD video;
# the stream is tagged accordingly as well.
_TO_YUV = dict(
    format="yuv420p",
    dst_colorspace=Colorspace.ITU709,
    dst_color_range=ColorRange.MPEG,
    interpolation=Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT,
)
# Permissions of the finished file (mkstemp creates 0600, which a web server could not read).
FILE_MODE = 0o644


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp file name beside ``path`` (parents created); on success it becomes ``path``
    with mode 0644 in one rename, on any exception it is removed. ``path`` never holds a partial file."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        yield tmp_name
        os.chmod(tmp_name, FILE_MODE)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def encode_mp4(
    frames: np.ndarray,
    path: str | os.PathLike,
    fps: int = 16,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    threads: int = DEFAULT_THREADS,
) -> None:
    """Write uint8 RGB ``frames`` of shape ``(n, h, w, 3)`` to ``path`` as H.264/yuv420p MP4.

    ``h`` and ``w`` must be even (yuv420p); colours are converted and tagged as BT.709.
    The file is written next to ``path`` and renamed into place, so ``path`` never holds a
    partial file; parent directories are created.
    Deterministic: the same frames and settings give a byte-identical file. The moov atom
    is at the front (``+faststart``) so browsers can start playback before the download ends.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames of shape (n, h, w, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")

    with atomic_output(path) as tmp_name:
        # format= is explicit because the temp name has no .mp4 suffix; +bitexact keeps the
        # muxer from writing version strings or times that would break byte-identity.
        with av.open(
            tmp_name, mode="w", format="mp4",
            options={"movflags": "+faststart", "fflags": "+bitexact"},
        ) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            codec = stream.codec_context
            codec.thread_count = threads
            codec.colorspace = Colorspace.ITU709
            codec.color_primaries = ColorPrimaries.BT709
            codec.color_trc = ColorTrc.BT709
            codec.color_range = ColorRange.MPEG
            # MB-tree rate control made repeated encodes of the same frames differ on a loaded machine
            # (seen here 1 in ~3 under CPU contention, even single-threaded); without it they never did.
            stream.options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
            time_base = Fraction(1, fps)
            to_yuv = VideoReformatter()  # one scaler context for every frame (a new one per frame cost more)
            for index, rgb in enumerate(frames):
                rgb_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame = to_yuv.reformat(rgb_frame, **_TO_YUV)
                frame.pts = index
                frame.time_base = time_base
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))  # flush delayed (B-)frames
    logger.debug("encoded %d frames %dx%d to %s", len(frames), width, height, path)


def probe_mp4(path: str | os.PathLike) -> dict:
    """Decode the first video stream of ``path`` and describe it.

    Returns ``{"codec", "pix_fmt", "width", "height", "frames", "fps"}`` where ``frames`` is
    the number of frames actually decoded and ``fps`` the stream's average rate as a float.
    """
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        decoded = sum(1 for _ in container.decode(stream))
        return {
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "frames": decoded,
            "fps": float(stream.average_rate) if stream.average_rate else None,
        }


DEFAULT_POSTER_QUALITY = 90


def write_poster(
    frames: np.ndarray,
    path: str | os.PathLike,
    *,
    index: int | None = None,
    quality: int = DEFAULT_POSTER_QUALITY,
) -> int:
    """Write one frame of uint8 ``(n, h, w, 3)`` ``frames`` to ``path`` as a JPEG; return its index.

    ``index`` None takes the middle frame (``n // 2``): for I2V the first frame is only the
    input image. Negative indexes count from the end; out of range is ``IndexError``.
    ``quality`` is Pillow's JPEG quality, 1–95. Written to a temp file beside ``path`` and
    renamed into place (mode 0644, parents created), like :func:`encode_mp4`.
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames of shape (n, h, w, 3), got {frames.dtype} {frames.shape}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality must be an integer from 1 to 95, got {quality!r}")
    count = len(frames)
    chosen = count // 2 if index is None else index
    if not -count <= chosen < count:
        raise IndexError(f"poster frame {chosen} out of range for {count} frames")
    chosen %= count

    with atomic_output(path) as tmp_name, open(tmp_name, "wb") as handle:
        Image.fromarray(np.ascontiguousarray(frames[chosen])).save(handle, format="JPEG", quality=quality)
    return chosen


def video_metadata(path: str | os.PathLike) -> dict:
    """``{"frames", "fps", "duration_s", "width", "height", "size_bytes"}`` of an MP4 file.

    Read from the container's index without decoding: ``frames`` is the video stream's sample
    count, ``duration_s`` is ``frames / fps`` (5.0625 for 81 frames at 16 fps; None without a
    frame rate) and ``size_bytes`` the file size.
    """
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        frames, rate = stream.frames, stream.average_rate
        width, height = stream.codec_context.width, stream.codec_context.height
    fps = float(rate) if rate else None
    return {
        "frames": frames,
        "fps": fps,
        "duration_s": frames / fps if fps else None,
        "width": width,
        "height": height,
        "size_bytes": os.stat(path).st_size,
    }
