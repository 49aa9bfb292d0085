"""Encode uint8 RGB frames to browser-friendly H.264 MP4 files, and probe them back."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import queue
import tempfile
import threading
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


class AtomicFile:
    """A temp file beside ``path`` (parents created) that becomes ``path`` only on :meth:`commit`:
    mode 0644, one rename. :meth:`discard` removes it. ``path`` never holds a partial file."""

    def __init__(self, path: str | os.PathLike):
        self.target = pathlib.Path(path)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        fd, self.name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".part", dir=self.target.parent)
        os.close(fd)

    def commit(self) -> None:
        os.chmod(self.name, FILE_MODE)
        os.replace(self.name, self.target)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.name)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yield the name of an :class:`AtomicFile` for ``path``: committed when the block succeeds,
    discarded on any exception."""
    output = AtomicFile(path)
    try:
        yield output.name
        output.commit()
    except BaseException:
        output.discard()
        raise


def _checked_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames of shape (n, h, w, 3), got {frames.dtype} {frames.shape}")
    return frames


class Mp4Writer:
    """An H.264/yuv420p MP4 written chunk by chunk: :meth:`write` uint8 RGB frames ``(n, h, w, 3)``
    as they become available, then :meth:`close`.

    The first chunk fixes ``h`` and ``w`` (both even, for yuv420p); later chunks must match
    (``ValueError``). Colours are converted and tagged as BT.709. Deterministic: the same frames
    and settings give a byte-identical file however they were split into chunks. The moov atom
    is at the front (``+faststart``) so browsers can start playback before the download ends.
    The file appears at ``path`` only when :meth:`close` succeeds (parents created); :meth:`abort`
    leaves nothing. Once closed or aborted, both do nothing more. A ``with`` block closes on success
    and aborts on an exception. Not thread-safe: see :class:`BackgroundMp4Writer` to encode on
    another thread.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int = 16,
        *,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
        threads: int = DEFAULT_THREADS,
    ):
        self.path, self.fps = path, fps
        self._stream_options = {"crf": str(crf), "preset": preset, "x264-params": "mbtree=0"}
        self._threads = threads
        self._output: AtomicFile | None = None
        self._container = None
        self._stream = None
        self._to_yuv = VideoReformatter()  # one scaler context for every frame (a new one per frame cost more)
        self._finished = False
        self._committed = False
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        frames = _checked_frames(frames)
        _, height, width, _ = frames.shape
        if self._stream is None:
            self._open(height, width)
        elif (height, width) != (self._stream.height, self._stream.width):
            raise ValueError(f"frames of {width}x{height} in a {self._stream.width}x{self._stream.height} video")
        time_base = Fraction(1, self.fps)
        for rgb in frames:
            rgb_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = self._to_yuv.reformat(rgb_frame, **_TO_YUV)
            frame.pts = self.frames_written
            frame.time_base = time_base
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and put the file in place; ``ValueError`` if no frame was written."""
        if self._finished:
            return
        if self._stream is None:
            raise ValueError("no frames were written")
        self._finished = True
        try:
            self._container.mux(self._stream.encode(None))  # flush delayed (B-)frames
            self._container.close()
            self._output.commit()
            self._committed = True
        except BaseException:
            self.abort()
            raise
        logger.debug("encoded %d frames %dx%d to %s", self.frames_written, self._stream.width, self._stream.height,
                     self.path)  # fmt: skip

    def metadata(self) -> dict:
        """What :func:`video_metadata` reads from the finished file, from what was written (no reopening).

        Only after a successful :meth:`close` (``RuntimeError`` before).
        """
        if not self._committed:
            raise RuntimeError("metadata() needs a closed, committed video")
        return _metadata(self.frames_written, float(self.fps), self._stream.width, self._stream.height, self.path)

    def abort(self) -> None:
        """Stop and remove the partial file; never raises."""
        self._finished = True
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
        if self._output is not None:
            self._output.discard()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
        self._output = AtomicFile(self.path)
        # format= is explicit because the temp name has no .mp4 suffix; +bitexact keeps the
        # muxer from writing version strings or times that would break byte-identity.
        self._container = av.open(
            self._output.name, mode="w", format="mp4", options={"movflags": "+faststart", "fflags": "+bitexact"}
        )
        stream = self._container.add_stream("libx264", rate=self.fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        codec = stream.codec_context
        codec.thread_count = self._threads
        codec.colorspace = Colorspace.ITU709
        codec.color_primaries = ColorPrimaries.BT709
        codec.color_trc = ColorTrc.BT709
        codec.color_range = ColorRange.MPEG
        # MB-tree rate control made repeated encodes of the same frames differ on a loaded machine
        # (seen here 1 in ~3 under CPU contention, even single-threaded); without it they never did.
        stream.options = self._stream_options
        self._stream = stream


def encode_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 16, **settings) -> None:
    """Write uint8 RGB ``frames`` of shape ``(n, h, w, 3)`` to ``path`` in one go: an
    :class:`Mp4Writer` (same file, same rules; ``settings`` are its ``crf``/``preset``/``threads``)."""
    frames = _checked_frames(frames)
    with Mp4Writer(path, fps, **settings) as writer:
        writer.write(frames)


class BackgroundMp4Writer:
    """An :class:`Mp4Writer` run by its own thread: :meth:`write` only queues the frames, so encoding
    overlaps whatever produces the next ones (x264 and the colour conversion run without the GIL).

    Queued frames must not be modified afterwards (they are not copied). An error of the encoding
    thread is raised by the next :meth:`write` or by :meth:`close`. :meth:`close` waits until every
    queued frame is encoded and the file is in place; :meth:`abort` drops what is queued and leaves
    nothing. Once closed or aborted, both do nothing more (a failed close raises its error again).
    A ``with`` block closes on success and aborts on an exception, as with :class:`Mp4Writer`.
    """

    _END, _ABORT = object(), object()

    def __init__(self, path: str | os.PathLike, fps: int = 16, **settings):
        self._writer = Mp4Writer(path, fps, **settings)
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._finished = False
        self._aborting = False
        self._thread = threading.Thread(target=self._encode_queued, name="lightx2v-mp4-writer", daemon=True)
        self._thread.start()

    @property
    def frames_written(self) -> int:
        return self._writer.frames_written

    def write(self, frames: np.ndarray) -> None:
        self._raise_error()
        self._chunks.put(_checked_frames(frames))

    def close(self) -> None:
        self._stop(self._END)
        self._raise_error()

    def abort(self) -> None:
        """Stop the thread (after the chunk it is encoding, not the backlog) and remove the partial
        file; never raises."""
        self._aborting = True
        self._stop(self._ABORT)

    def metadata(self) -> dict:
        """:meth:`Mp4Writer.metadata` of the finished file, after a successful :meth:`close`."""
        return self._writer.metadata()

    def __enter__(self) -> BackgroundMp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _stop(self, how) -> None:
        if not self._finished:
            self._finished = True
            self._chunks.put(how)
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _encode_queued(self) -> None:
        try:
            while (chunk := self._chunks.get()) is not self._ABORT and not self._aborting:
                if chunk is self._END:
                    self._writer.close()  # removes the partial file itself when it fails
                    return
                self._writer.write(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the producer by write() or close()
            self._error = exc
        self._writer.abort()


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

    frames = _checked_frames(frames)
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
    return _metadata(frames, float(rate) if rate else None, width, height, path)


def _metadata(frames: int, fps: float | None, width: int, height: int, path: str | os.PathLike) -> dict:
    return {
        "frames": frames,
        "fps": fps,
        "duration_s": frames / fps if fps else None,
        "width": width,
        "height": height,
        "size_bytes": os.stat(path).st_size,
    }
