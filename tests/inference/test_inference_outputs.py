"""write_poster (one JPEG frame, atomic), video_metadata (what the MP4 holds) and the writers' own account of it."""

import os
import stat

import numpy as np
import pytest
from PIL import Image

from inference.encode import BackgroundMp4Writer, Mp4Writer, encode_mp4, video_metadata, write_poster

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def coloured_frames(height: int = 32, width: int = 48) -> np.ndarray:
    """One solid colour per frame, so the poster shows which frame it took."""
    return np.stack([np.full((height, width, 3), colour, np.uint8) for colour in COLOURS])


def poster_colour(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB")).reshape(-1, 3).mean(0)


@pytest.mark.parametrize("index, expected", [(None, 2), (0, 0), (-1, 4), (3, 3)])
def test_poster_is_the_middle_frame_unless_an_index_is_given(tmp_path, index, expected):
    target = tmp_path / "posters" / "clip.jpg"
    assert write_poster(coloured_frames(), target, index=index) == expected
    assert np.abs(poster_colour(target) - COLOURS[expected]).max() < 6
    assert os.listdir(target.parent) == ["clip.jpg"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    with Image.open(target) as image:
        assert image.size == (48, 32)


def test_lower_quality_writes_a_smaller_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    write_poster(frames, tmp_path / "high.jpg", quality=95)
    write_poster(frames, tmp_path / "low.jpg", quality=10)
    assert (tmp_path / "low.jpg").stat().st_size < (tmp_path / "high.jpg").stat().st_size


@pytest.mark.parametrize("frames, kwargs, error", [
    (coloured_frames(), dict(index=5), IndexError),
    (coloured_frames(), dict(index=-6), IndexError),
    (coloured_frames(), dict(quality=0), ValueError),
    (coloured_frames(), dict(quality=96), ValueError),
    (coloured_frames().astype(np.float32), {}, ValueError),
    (np.zeros((0, 8, 8, 3), np.uint8), {}, ValueError),
])
def test_bad_poster_requests_raise_and_write_nothing(tmp_path, frames, kwargs, error):
    with pytest.raises(error):
        write_poster(frames, tmp_path / "clip.jpg", **kwargs)
    assert os.listdir(tmp_path) == []


def test_failed_poster_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "clip.jpg"
    target.write_bytes(b"previous poster")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"half a jpeg")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_poster(coloured_frames(), target)
    assert target.read_bytes() == b"previous poster"
    assert os.listdir(tmp_path) == ["clip.jpg"]


def test_video_metadata_reports_frames_fps_duration_size_and_bytes(tmp_path):
    frames = np.repeat(coloured_frames(), 4, axis=0)[:17]
    encode_mp4(frames, tmp_path / "clip.mp4", fps=16)
    assert video_metadata(tmp_path / "clip.mp4") == {
        "frames": 17, "fps": 16.0, "duration_s": 17 / 16, "width": 48, "height": 32,
        "size_bytes": (tmp_path / "clip.mp4").stat().st_size,
    }


@pytest.mark.parametrize("writer_class", [Mp4Writer, BackgroundMp4Writer])
def test_a_writer_reports_the_metadata_the_finished_file_holds(tmp_path, writer_class):
    frames = np.repeat(coloured_frames(), 4, axis=0)[:17]
    writer = writer_class(tmp_path / "clip.mp4", fps=16)
    writer.write(frames[:9])
    writer.write(frames[9:])
    with pytest.raises(RuntimeError, match="closed"):
        writer.metadata()
    writer.close()
    assert writer.metadata() == video_metadata(tmp_path / "clip.mp4")


def test_an_aborted_writer_has_no_metadata(tmp_path):
    writer = Mp4Writer(tmp_path / "clip.mp4", fps=16)
    writer.write(coloured_frames())
    writer.abort()
    with pytest.raises(RuntimeError, match="closed"):
        writer.metadata()
