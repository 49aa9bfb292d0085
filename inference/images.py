"""Fit an I2V input image to the video size: the ``resize_mode`` rules.

``stretch`` (default, the behaviour before resize modes existed): the image goes to the
    pipeline as it is; the pipeline resizes it to exactly height×width, ignoring its aspect
    ratio, and the CLIP image encoder sees the original.
``adaptive``: the video takes the image's aspect ratio at (at most) the requested area
    height×width: ``h = ⌊√(area·ih/iw)⌋`` and ``w = ⌊√(area·iw/ih)⌋``, each rounded down to a
    multiple of 16, at least 16, and scaled down (aspect kept) so no side exceeds ``max_side``.
    The output size therefore differs from the request; :func:`fit_size` tells it in advance.
``fixed_shape``: exactly height×width; the image is scaled to cover it (aspect kept) and the
    centre cut out, so nothing is distorted and the overflow is cropped.

An image that already has the target size is passed through unresized (pixel for pixel) in
every mode, e.g. the last frame of a previous fragment.
"""

from __future__ import annotations

import math

from PIL import Image

RESIZE_MODES = ("stretch", "adaptive", "fixed_shape")
SIZE_MULTIPLE = 16  # VAE stride 8 × transformer patch 2
# The API's largest side (height and width are 16–1280): adaptive sizes never exceed it.
MAX_SIDE = 1280
# What the Wan pipelines' VaeImageProcessor resizes with.
RESAMPLE = Image.Resampling.LANCZOS


def check_resize_mode(resize_mode: str) -> None:
    """Raise ``ValueError`` unless ``resize_mode`` is one of :data:`RESIZE_MODES`."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}; got {resize_mode!r}")


def _round_down(value: int) -> int:
    return max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)


def fit_size(
    image_width: int,
    image_height: int,
    *,
    height: int,
    width: int,
    resize_mode: str,
    max_side: int | None = MAX_SIDE,
) -> tuple[int, int]:
    """``(height, width)`` of the video for an image of this size (see the module rules).

    Pure integer arithmetic, so a server can store the size before the task runs.
    ``stretch`` and ``fixed_shape`` return the requested size; ``adaptive`` the fitted one.
    """
    check_resize_mode(resize_mode)
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
    if resize_mode != "adaptive":
        return height, width
    area = height * width
    # isqrt of the floored quotient is exactly ⌊√(area·ih/iw)⌋: no float rounding, so an image
    # with the request's aspect ratio gets back exactly the requested size.
    fitted_height = math.isqrt(area * image_height // image_width)
    fitted_width = math.isqrt(area * image_width // image_height)
    if max_side is not None and max(fitted_height, fitted_width) > max_side:
        if fitted_height >= fitted_width:
            fitted_height, fitted_width = max_side, max_side * image_width // image_height
        else:
            fitted_height, fitted_width = max_side * image_height // image_width, max_side
    return _round_down(fitted_height), _round_down(fitted_width)


def prepare_image(
    image: Image.Image,
    *,
    height: int,
    width: int,
    resize_mode: str,
    max_side: int | None = MAX_SIDE,
) -> tuple[Image.Image, int, int]:
    """``(rgb_image, height, width)``: the image to hand the I2V pipeline and the video size.

    ``stretch``: the image unchanged (as RGB) and the requested size. ``adaptive``: the image
    resized to :func:`fit_size`'s size. ``fixed_shape``: the centre crop of the image at the
    requested aspect ratio, resized to exactly height×width. Resizing uses Lanczos; an image
    already of the target size is returned as is. The input image is never modified.
    """
    rgb = image.convert("RGB")
    out_height, out_width = fit_size(
        rgb.width, rgb.height, height=height, width=width, resize_mode=resize_mode, max_side=max_side
    )
    if resize_mode == "stretch" or rgb.size == (out_width, out_height):
        return rgb, out_height, out_width
    if resize_mode == "adaptive":
        return rgb.resize((out_width, out_height), RESAMPLE), out_height, out_width
    # Crop first: resizing with a box would let the filter read pixels outside the crop.
    return rgb.crop(_centre_box(rgb.size, out_width, out_height)).resize((out_width, out_height), RESAMPLE), \
        out_height, out_width


def _centre_box(size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred whole-pixel box of an image of ``size`` with aspect ``width``:``height``."""
    image_width, image_height = size
    if image_width * height > width * image_height:  # wider than the target: cut the sides
        crop_width = max(1, round(image_height * width / height))
        left = (image_width - crop_width) // 2
        return (left, 0, left + crop_width, image_height)
    crop_height = max(1, round(image_width * height / width))
    top = (image_height - crop_height) // 2
    return (0, top, image_width, top + crop_height)
