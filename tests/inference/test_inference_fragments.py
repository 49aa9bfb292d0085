"""Long videos: fragment 2 (I2V, seed + 1) is conditioned on exactly the last frame of fragment 1."""

import numpy as np
import pytest

from inference.generate import GenerationRequest, continuation_request, generate_frames, last_frame_image


def recording(method, images: list):
    """``method`` that first appends the image it is called with to ``images``."""
    def wrapper(image, *args, **kwargs):
        images.append(image)
        return method(image, *args, **kwargs)
    return wrapper


@pytest.mark.parametrize("resize_mode", ["stretch", "adaptive", "fixed_shape"])
def test_second_fragment_is_conditioned_on_exactly_the_last_frame_of_the_first(
        t2v_pipe, i2v_pipe, monkeypatch, resize_mode):
    shape = dict(prompt="a dog runs on the beach", num_frames=5, height=32, width=48, infer_steps=2)
    first = generate_frames(t2v_pipe, GenerationRequest(**shape, seed=10))

    # What the I2V pipeline gets: the CLIP image encoder's input and the VAE condition's input.
    encoded, preprocessed = [], []
    real_encode_image = i2v_pipe.encode_image
    real_preprocess = i2v_pipe.video_processor.preprocess
    monkeypatch.setattr(i2v_pipe, "encode_image", recording(real_encode_image, encoded))
    monkeypatch.setattr(i2v_pipe.video_processor, "preprocess", recording(real_preprocess, preprocessed))
    follow_up = GenerationRequest(**shape, seed=11, image=last_frame_image(first), resize_mode=resize_mode)
    second = generate_frames(i2v_pipe, follow_up)

    assert second.shape == first.shape
    assert len(encoded) == len(preprocessed) == 1
    for image in (encoded[0], preprocessed[0]):
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), first[-1])


def test_continuation_after_an_adaptive_i2v_fragment_keeps_its_size_and_conditions_on_its_last_frame(
        i2v_pipe, monkeypatch):
    from PIL import Image

    wide_image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 100, 3), dtype=np.uint8))
    first_request = GenerationRequest(prompt="a train in the city", image=wide_image, num_frames=5, height=32,
                                      width=32, infer_steps=1, seed=20, resize_mode="adaptive")
    first = generate_frames(i2v_pipe, first_request)
    assert first.shape == (5, 16, 48, 3)  # the image's aspect ratio, not the 32x32 asked for

    follow_up = continuation_request(first_request, first)
    assert (follow_up.seed, follow_up.output_size(), follow_up.prompt) == (21, (16, 48), first_request.prompt)
    preprocessed = []
    real_preprocess = i2v_pipe.video_processor.preprocess
    monkeypatch.setattr(i2v_pipe.video_processor, "preprocess", recording(real_preprocess, preprocessed))
    second = generate_frames(i2v_pipe, follow_up)
    assert second.shape == first.shape
    np.testing.assert_array_equal(np.asarray(preprocessed[0]), first[-1])
