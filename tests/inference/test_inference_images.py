"""resize_mode for I2V images: stretch (as before), adaptive (image aspect, same area), fixed_shape (crop)."""

import numpy as np
import pytest
from PIL import Image

from inference.generate import GenerationRequest, generate_frames
from inference.images import fit_size, prepare_image


def bands(width: int, height: int) -> Image.Image:
    """Three vertical colour bands (red, green, blue) of equal width."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third] = (255, 0, 0)
    pixels[:, third:2 * third] = (0, 255, 0)
    pixels[:, 2 * third:] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("image_size, requested, fitted", [
    ((832, 480), (480, 832), (480, 832)),    # same aspect: exactly the requested size
    ((480, 832), (480, 832), (832, 480)),    # portrait image: the video turns portrait
    ((1000, 1000), (480, 832), (624, 624)),  # square at (at most) 480x832's area
    ((2000, 500), (480, 832), (304, 1248)),
    ((1280, 720), (720, 1280), (720, 1280)),
    ((3000, 300), (720, 1280), (128, 1280)),  # 10:1 would be 3035 wide: held to the 1280 side limit
    ((300, 3000), (720, 1280), (1280, 128)),
    ((64, 32), (32, 32), (16, 32)),
    ((10000, 10), (32, 32), (16, 1008)),      # never below 16
])
def test_adaptive_size_keeps_the_image_aspect_at_the_requested_area(image_size, requested, fitted):
    height, width = requested
    assert fit_size(*image_size, height=height, width=width, resize_mode="adaptive") == fitted


@pytest.mark.parametrize("image_width, image_height", [(640, 480), (481, 853), (1920, 1080), (333, 777), (50, 49)])
def test_adaptive_sizes_are_multiples_of_16_within_the_area_and_close_to_the_aspect(image_width, image_height):
    out_height, out_width = fit_size(image_width, image_height, height=480, width=832, resize_mode="adaptive")
    assert out_height % 16 == 0 and out_width % 16 == 0
    assert out_height * out_width <= 480 * 832
    assert abs(np.log((out_width / out_height) / (image_width / image_height))) < 0.06


@pytest.mark.parametrize("mode", ["stretch", "fixed_shape"])
def test_stretch_and_fixed_shape_keep_the_requested_size(mode):
    assert fit_size(2000, 500, height=480, width=832, resize_mode=mode) == (480, 832)


def test_fixed_shape_crops_the_centre_without_distortion():
    wide, height, width = prepare_image(bands(300, 100), height=32, width=32, resize_mode="fixed_shape")
    assert (wide.size, height, width) == ((32, 32), 32, 32)
    assert (np.asarray(wide) == (0, 255, 0)).all(), "only the green middle band survives a square crop"
    tall, _, _ = prepare_image(bands(90, 300).rotate(90, expand=True), height=64, width=32, resize_mode="fixed_shape")
    assert tall.size == (32, 64)


def test_adaptive_resizes_the_whole_image_to_the_fitted_size():
    image, height, width = prepare_image(bands(300, 100), height=64, width=64, resize_mode="adaptive")
    assert (height, width) == (32, 96) and image.size == (96, 32)
    left, middle, right = np.asarray(image)[16, [2, 48, 93]]
    assert left[0] > 200 and middle[1] > 200 and right[2] > 200, "all three bands are still there"


def test_stretch_hands_over_the_original_image_for_the_pipeline_to_resize():
    original = bands(300, 100)
    image, height, width = prepare_image(original, height=32, width=32, resize_mode="stretch")
    assert (image.size, height, width) == ((300, 100), 32, 32)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(original))


@pytest.mark.parametrize("mode", ["stretch", "adaptive", "fixed_shape"])
def test_an_image_of_the_target_size_passes_through_pixel_for_pixel_as_rgb(mode):
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 4), dtype=np.uint8), "RGBA")
    image, height, width = prepare_image(rgba, height=32, width=48, resize_mode=mode)
    assert (image.mode, image.size, height, width) == ("RGB", (48, 32), 32, 48)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(rgba.convert("RGB")))
    assert rgba.mode == "RGBA"  # the input is left alone


def test_unknown_resize_mode_is_rejected():
    with pytest.raises(ValueError, match="resize_mode"):
        GenerationRequest(prompt="p", resize_mode="crop")
    with pytest.raises(ValueError, match="resize_mode"):
        fit_size(10, 10, height=16, width=16, resize_mode="crop")


@pytest.mark.parametrize("mode, size", [("stretch", (32, 32)), ("adaptive", (16, 32)), ("fixed_shape", (32, 32))])
def test_i2v_generation_uses_the_size_the_mode_gives(i2v_pipe, mode, size):
    request = GenerationRequest(prompt="a cat", image=bands(64, 32), num_frames=5, height=32, width=32,
                                infer_steps=1, resize_mode=mode)
    assert request.output_size() == size
    assert generate_frames(i2v_pipe, request).shape == (5, *size, 3)
