"""Turning what a client sent (upload, ``data:`` URL, server path) into a verified RGB image.

Every route decodes the whole image with Pillow, with the decompression-bomb limit applied, so
a file that only claims to be an image never reaches the queue.
"""
import base64
import binascii
import io
import re
import struct
import warnings
from pathlib import Path

from django.conf import settings
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.images import MAX_SIDE

# MPO is what Pillow calls a camera JPEG that carries extra frames (depth, stereo): its first frame is used.
ACCEPTED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}
DATA_URL = re.compile(r"^data:image/(?P<subtype>[a-z0-9.+-]{1,40});base64,(?P<payload>.*)$", re.IGNORECASE | re.DOTALL)


class InvalidImage(ValueError):
    """The input is not an acceptable image; the message says why, for the client."""


def decode_image(raw: bytes | io.BufferedIOBase) -> Image.Image:
    """Decode and fully load an image from bytes or a binary file, upright (EXIF orientation applied),
    as RGB, its short side at most ``MAX_SIDE``; raises ``InvalidImage``."""
    stream = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    max_pixels = settings.LIGHTX2V_MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise InvalidImage(f"unsupported image format {image.format}; use PNG, JPEG or WebP")
                if image.width * image.height > max_pixels:
                    raise InvalidImage(f"image has more than {max_pixels} pixels")
                image.load()
                return _bounded(_upright(image).convert("RGB"))
    except InvalidImage:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage("not a decodable image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage("not a decodable image (truncated or corrupt)") from exc


def _bounded(image: Image.Image) -> Image.Image:
    """``image`` scaled down (aspect kept) so its short side is at most ``MAX_SIDE``: every video size
    (at most ``MAX_SIDE`` a side) still covers it without upscaling, and a 40-megapixel photo is not
    stored (as PNG) and loaded for its run at full size."""
    short_side = min(image.size)
    if short_side <= MAX_SIDE:
        return image
    scale = MAX_SIDE / short_side
    size = (max(MAX_SIDE, round(image.width * scale)), max(MAX_SIDE, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says; as it is when that metadata is unreadable."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return image


def decode_data_url(url: str) -> Image.Image:
    """Decode a ``data:image/...;base64,`` URL; raises ``InvalidImage``."""
    match = DATA_URL.match(url)
    if not match:
        raise InvalidImage("must be a data:image/...;base64, URL")
    try:
        raw = base64.b64decode(match["payload"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("data URL payload is not valid base64") from exc
    if len(raw) > settings.LIGHTX2V_MAX_UPLOAD_BYTES:
        raise InvalidImage(f"image is larger than {settings.LIGHTX2V_MAX_UPLOAD_BYTES} bytes")
    return decode_image(raw)


def load_image_file(path: Path) -> Image.Image:
    """Decode an image file already known to lie inside an input root."""
    if path.stat().st_size > settings.LIGHTX2V_MAX_UPLOAD_BYTES:
        raise InvalidImage(f"image is larger than {settings.LIGHTX2V_MAX_UPLOAD_BYTES} bytes")
    with path.open("rb") as handle:
        return decode_image(handle)
