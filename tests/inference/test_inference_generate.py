"""generate_frames on the tiny Wan pipelines: shapes, determinism, progress, cancellation."""

import numpy as np
import pytest
from PIL import Image

from inference.encode import encode_mp4
from inference.generate import (
    FPS,
    GenerationRequest,
    frames_for_duration,
    generate_frames,
    last_frame_image,
)


def small_request(**overrides) -> GenerationRequest:
    fields = dict(prompt="a red cat runs on the beach at sunset", num_frames=17, height=64, width=64,
                  infer_steps=4, seed=0)
    fields.update(overrides)
    return GenerationRequest(**fields)


def gradient_image(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], x[::-1][None, :], np.full((height, width), 90, np.uint8)), -1)
    return Image.fromarray(np.ascontiguousarray(rgb.astype(np.uint8)))


class CancelledByCaller(Exception):
    pass


def test_five_seconds_at_16_fps_is_81_frames():
    assert FPS == 16
    assert frames_for_duration(5) == 81
    assert frames_for_duration(2, fps=8) == 17


def test_t2v_returns_uint8_frames_of_requested_shape(t2v_pipe):
    frames = generate_frames(t2v_pipe, small_request())
    assert frames.dtype == np.uint8
    assert frames.shape == (17, 64, 64, 3)


def test_i2v_with_small_image_returns_requested_shape(i2v_pipe):
    request = small_request(image=gradient_image(), num_frames=9, height=32, width=48, infer_steps=2)
    frames = generate_frames(i2v_pipe, request)
    assert frames.dtype == np.uint8
    assert frames.shape == (9, 32, 48, 3)


def test_i2v_accepts_non_rgb_image(i2v_pipe):
    request = small_request(image=gradient_image().convert("L"), num_frames=5, height=32, width=32, infer_steps=1)
    assert generate_frames(i2v_pipe, request).shape == (5, 32, 32, 3)


def test_same_request_gives_identical_frames_and_identical_mp4_bytes(t2v_pipe, tmp_path):
    first = generate_frames(t2v_pipe, small_request())
    second = generate_frames(t2v_pipe, small_request())
    np.testing.assert_array_equal(first, second)

    encode_mp4(first, tmp_path / "first.mp4")
    encode_mp4(second, tmp_path / "second.mp4")
    assert (tmp_path / "first.mp4").read_bytes() == (tmp_path / "second.mp4").read_bytes()


def test_different_seed_gives_different_frames(t2v_pipe):
    frames_seed0 = generate_frames(t2v_pipe, small_request(seed=0))
    frames_seed1 = generate_frames(t2v_pipe, small_request(seed=1))
    assert not np.array_equal(frames_seed0, frames_seed1)


def test_on_step_reports_each_step_in_order_with_total(t2v_pipe):
    calls = []
    generate_frames(t2v_pipe, small_request(infer_steps=3), on_step=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_exception_from_on_step_propagates_stops_at_once_and_frees_hooks(t2v_pipe, monkeypatch):
    decode_calls, free_calls, steps = [], [], []
    real_decode = t2v_pipe.vae.decode
    monkeypatch.setattr(t2v_pipe.vae, "decode", lambda *a, **k: decode_calls.append(1) or real_decode(*a, **k))
    monkeypatch.setattr(t2v_pipe, "maybe_free_model_hooks", lambda: free_calls.append(1))

    def cancel_at_step_two(step, total):
        steps.append(step)
        if step == 2:
            raise CancelledByCaller("user cancelled")

    result = None
    with pytest.raises(CancelledByCaller, match="user cancelled"):
        result = generate_frames(t2v_pipe, small_request(infer_steps=4), on_step=cancel_at_step_two)
    assert result is None
    assert steps == [1, 2]
    assert decode_calls == []  # aborted before the VAE decode
    assert free_calls, "maybe_free_model_hooks must run on the way out"


def test_image_request_on_t2v_pipe_is_rejected(t2v_pipe):
    with pytest.raises(ValueError, match="WanImageToVideoPipeline"):
        generate_frames(t2v_pipe, small_request(image=gradient_image()))


def test_text_request_on_i2v_pipe_is_rejected(i2v_pipe):
    with pytest.raises(ValueError, match="WanPipeline"):
        generate_frames(i2v_pipe, small_request())


@pytest.mark.parametrize(
    "overrides",
    [dict(num_frames=16), dict(num_frames=0), dict(height=60), dict(width=0), dict(infer_steps=0)],
)
def test_request_rejects_values_the_pipeline_would_round_or_reject(overrides):
    with pytest.raises(ValueError):
        small_request(**overrides)


def test_default_request_is_5_seconds_480x832_4_steps_without_cfg():
    request = GenerationRequest(prompt="p")
    assert (request.num_frames, request.height, request.width) == (81, 480, 832)
    assert (request.infer_steps, request.guidance_scale, request.kind) == (4, 1.0, "t2v")


def test_full_width_480x832_request_runs_on_tiny_model(t2v_pipe):
    # One frame keeps the VAE decode cheap; the point is the 52-patch-wide rope table.
    frames = generate_frames(t2v_pipe, GenerationRequest(prompt="wide", num_frames=1, infer_steps=1))
    assert frames.shape == (1, 480, 832, 3)


def test_last_frame_image_is_last_frame_as_rgb():
    frames = np.zeros((3, 16, 32, 3), np.uint8)
    frames[-1, ..., 0] = 200
    image = last_frame_image(frames)
    assert image.mode == "RGB"
    assert image.size == (32, 16)
    np.testing.assert_array_equal(np.asarray(image), frames[-1])


def test_last_frame_can_seed_an_i2v_continuation(t2v_pipe, i2v_pipe):
    first = generate_frames(t2v_pipe, small_request(num_frames=5, height=32, width=32, infer_steps=1))
    follow_up = small_request(image=last_frame_image(first), num_frames=5, height=32, width=32, infer_steps=1)
    assert generate_frames(i2v_pipe, follow_up).shape == (5, 32, 32, 3)
