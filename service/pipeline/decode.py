"""Image bytes -> (H, W, 3) uint8 BGR array, with every limit enforced before decoding.

Order of checks: empty -> byte limit -> format sniffed from magic bytes (JPEG, PNG,
WebP, BMP only) -> header parsed lazily by Pillow -> pixel limit from the header ->
full decode (truncated data is an error; ``LOAD_TRUNCATED_IMAGES`` is never set) ->
EXIF orientation applied -> normalised to 3-channel 8-bit.

Animated WebP/PNG images are accepted and their first frame is used. Transparent
images are composited onto black; 16-bit images are scaled to 8 bits; grayscale
and palette images are expanded to three channels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CorruptImage, EmptyImage, ImageTooLarge, TooManyPixels, UnsupportedImageType

#: Pillow plugin names of the accepted formats.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def sniff_format(data: bytes) -> str | None:
    """The accepted format named by the data's magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return None


def _to_bgr8(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 BGR."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 255.0).astype(np.uint8)
        else:
            # 16-bit samples (Pillow opens 16-bit grayscale as "I;16" or "I").
            arr = (np.clip(arr.astype(np.int64), 0, 65535) // 257).astype(np.uint8)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
        return np.ascontiguousarray(arr)
    if mode == "L":
        gray = np.asarray(img)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode != "RGB":
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
        if img.mode == "RGBA":
            rgba = np.asarray(img)
            alpha = rgba[:, :, 3:4].astype(np.uint16)
            rgb = (rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255
            return np.ascontiguousarray(rgb.astype(np.uint8)[:, :, ::-1])
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])


def read_header(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Validate size, type and dimensions; return the lazily opened (undecoded) image."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageType("unsupported image type; send JPEG, PNG, WebP or BMP")
    try:
        with warnings.catch_warnings():
            # The pixel limit below is ours; Pillow's own warning is redundant.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"the image has too many pixels: {exc}") from None
    except UnidentifiedImageError:  # its message names only the in-memory file object
        raise CorruptImage(f"the {fmt} image header cannot be read: not a valid {fmt} "
                           "header") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(f"the {fmt} image header cannot be read: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"the image has invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return img


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Decode image bytes into an (H, W, 3) uint8 BGR array, or raise a ``PipelineError``."""
    img = read_header(data, max_bytes, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # first frame of an animated image
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"the image has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise CorruptImage(f"the {img.format} image cannot be decoded: {exc}") from None
    return _to_bgr8(img)
