"""encode_mp4 / probe_mp4: format, determinism, atomic writes."""

import os
import stat

import numpy as np
import pytest

from inference.encode import encode_mp4, probe_mp4


def sample_frames(count: int = 17, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, None, :, None]
    noise = rng.integers(0, 40, (count, height, width, 3))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)




def test_encoded_file_is_h264_yuv420p_with_all_frames_at_16_fps(tmp_path):
    frames = sample_frames()
    encode_mp4(frames, tmp_path / "clip.mp4", fps=16)
    assert probe_mp4(tmp_path / "clip.mp4") == {
        "codec": "h264", "pix_fmt": "yuv420p", "width": 64, "height": 48, "frames": 17, "fps": 16.0,
    }


def test_same_frames_encode_to_identical_bytes(tmp_path):
    frames = sample_frames()
    encode_mp4(frames, tmp_path / "a.mp4")
    encode_mp4(frames.copy(), tmp_path / "b.mp4")
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_moov_atom_precedes_media_data_for_progressive_playback(tmp_path):
    encode_mp4(sample_frames(), tmp_path / "clip.mp4")
    data = (tmp_path / "clip.mp4").read_bytes()
    assert 0 < data.index(b"moov") < data.index(b"mdat")


def test_creates_parent_dirs_and_leaves_only_the_target_readable_by_others(tmp_path):
    target = tmp_path / "media" / "videos" / "clip.mp4"
    encode_mp4(sample_frames(count=5), target)
    assert os.listdir(target.parent) == ["clip.mp4"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_failure_mid_encode_keeps_previous_file_and_leaves_no_temp_file(tmp_path, third_frame_conversion_fails):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous version")
    with pytest.raises(RuntimeError, match="disk on fire"):
        encode_mp4(sample_frames(count=9), target)
    assert target.read_bytes() == b"previous version"
    assert os.listdir(tmp_path) == ["clip.mp4"]


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((5, 16, 16, 3), np.float32),  # not uint8
        np.zeros((16, 16, 3), np.uint8),  # not a frame sequence
        np.zeros((5, 15, 16, 3), np.uint8),  # odd height
        np.zeros((0, 16, 16, 3), np.uint8),  # no frames
    ],
)
def test_rejects_frames_it_cannot_encode(tmp_path, frames):
    with pytest.raises(ValueError):
        encode_mp4(frames, tmp_path / "clip.mp4")
    assert not (tmp_path / "clip.mp4").exists()


def test_colours_survive_the_round_trip(tmp_path):
    import av

    frames = np.zeros((5, 32, 32, 3), np.uint8)
    frames[...] = (200, 50, 20)
    encode_mp4(frames, tmp_path / "clip.mp4")
    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(decoded.astype(int) - (200, 50, 20)).max() <= 4
