"""Image bytes -> (H, W, 3) uint8 BGR array, with every limit enforced before decoding.

Order of checks: empty -> byte limit -> format sniffed from magic bytes (JPEG, PNG,
WebP, BMP only) -> header parsed lazily by Pillow -> pixel limit from the header ->
decode cost in bytes from the header (mode, bit depth, channels: :func:`decode_cost`)
against ``max_decode_bytes`` -> full decode (truncated data is an error;
``LOAD_TRUNCATED_IMAGES`` is never set) -> normalised to 3-channel 8-bit, strip by strip
-> EXIF orientation applied.

Animated WebP/PNG images are accepted and their first frame is used. Transparent
images are composited onto black; 16-bit images keep their high byte; grayscale
and palette images are expanded to three channels.  Conversions run on strips of
``STRIP_PIXELS``, so a decode holds only Pillow's image and the 8-bit result at
full size; :class:`MemoryBudget` bounds the bytes of decodes in flight.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import (
    CorruptImage,
    DecodeTooLarge,
    EmptyImage,
    ImageTooLarge,
    TooManyPixels,
    UnsupportedImageType,
)

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


#: Pillow allocates decoded images in blocks of this size.  Above glibc's largest mmap
#: threshold (32 MiB), every block of a large image is its own mapping, returned to the
#: system when freed instead of staying in a thread's heap arena (Pillow's 16 MiB default
#: left ~250 MiB resident per thread that had decoded a 40 Mpx image).
PILLOW_BLOCK_BYTES = 64 * 1024 * 1024
Image.core.set_block_size(PILLOW_BLOCK_BYTES)

#: Pixels converted per strip: every conversion runs strip by strip on the Pillow image,
#: so the only full-size buffers are Pillow's decoded image and the 8-bit BGR result.
STRIP_PIXELS = 1 << 18
#: Upper bound of the bytes per pixel one strip's conversion holds (measured at most ~20).
_STRIP_BYTES_PER_PIXEL = 64
#: Bytes per pixel of Pillow's decoded image, by mode (Pillow pads 3-band modes to 4).
_CORE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
#: Bytes per pixel of the BGR result.
_OUT_BYTES = 3


def _strip_to_bgr8(img: Image.Image) -> np.ndarray:
    """A (small) Pillow image of any mode -> (h, w, 3) uint8 BGR."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            gray = np.clip(arr, 0.0, 255.0).astype(np.uint8)
        elif mode == "I":
            gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        else:  # 16-bit samples: keep the high byte
            gray = (arr >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "L":
        return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)
    if mode != "RGB":
        img = img.convert("RGBA" if "A" in mode or "transparency" in img.info else "RGB")
        if img.mode == "RGBA":  # composited onto black: round(rgb * alpha / 255)
            rgba = np.asarray(img).astype(np.uint16)
            rgb = (rgba[:, :, 2::-1] * rgba[:, :, 3:4] + 127) // 255
            return rgb.astype(np.uint8)
    return np.frombuffer(img.tobytes("raw", "BGR"), np.uint8).reshape(img.height, img.width, 3)


def _to_bgr8(img: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode -> (H, W, 3) uint8 BGR, converted strip by strip."""
    width, height = img.size
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, STRIP_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = img if rows >= height else img.crop((0, top, width, bottom))
        out[top:bottom] = _strip_to_bgr8(strip)
    return out


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (as Pillow's ``ImageOps.exif_transpose``) to a decoded array."""
    views = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, k=1),
    }
    view = views.get(orientation)
    return image if view is None else np.ascontiguousarray(view(image))


def decode_cost(img: Image.Image) -> int:
    """Bytes a decode of the opened (not yet decoded) image holds at its peak, from the header.

    Pillow's decoded image (by mode: 1 byte per pixel for bilevel, grayscale and palette
    images, 2 for 16-bit grayscale, 4 for everything else) next to the 8-bit BGR result,
    plus a decoder's own full-size buffers: progressive JPEG keeps every DCT coefficient
    (2 bytes per sample), WebP decodes into a 4-byte RGBA buffer copied twice more; and
    the strip being converted (``_STRIP_BYTES_PER_PIXEL``).  An EXIF rotation
    copies the result after Pillow's image is freed: at most two results at once.
    """
    per_pixel = _CORE_BYTES.get(img.mode, 4) + _OUT_BYTES
    if img.format == "JPEG" and (img.info.get("progressive") or img.info.get("progression")):
        per_pixel += 2 * len(img.getbands())
    if img.format == "WEBP":
        per_pixel += 10
    pixels = img.width * img.height
    strip = min(pixels, STRIP_PIXELS) * _STRIP_BYTES_PER_PIXEL
    return pixels * max(per_pixel, 2 * _OUT_BYTES) + strip


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a broken EXIF block is no reason to refuse the image
        return 1
    return value if isinstance(value, int) else 1


def read_header(
    data: bytes, max_bytes: int, max_pixels: int, max_decode_bytes: int | None = None
) -> Image.Image:
    """Validate size, type, dimensions and decode cost; return the lazily opened (undecoded)
    image.  ``max_decode_bytes`` bounds :func:`decode_cost` (None: no bound)."""
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
        raise CorruptImage(
            f"the {fmt} image header cannot be read: not a valid {fmt} header"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImage(f"the {fmt} image header cannot be read: {exc}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise CorruptImage(f"the image has invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if max_decode_bytes is not None and (cost := decode_cost(img)) > max_decode_bytes:
        raise DecodeTooLarge(
            f"decoding this {width}x{height} {fmt} image (mode {img.mode}) takes about {cost} "
            f"bytes of memory; the limit is {max_decode_bytes}: send a smaller or 8-bit image"
        )
    return img


def decode_opened(img: Image.Image) -> np.ndarray:
    """Decode an image opened by :func:`read_header` into (H, W, 3) uint8 BGR (EXIF
    orientation applied), freeing Pillow's copy before the result is rotated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # first frame of an animated image
            image = _to_bgr8(img)
            orientation = _orientation(img)
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(f"the image has too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise CorruptImage(f"the {img.format} image cannot be decoded: {exc}") from None
    finally:
        img.close()
    return _orient(image, orientation)


def decode_image(
    data: bytes, max_bytes: int, max_pixels: int, max_decode_bytes: int | None = None
) -> np.ndarray:
    """Decode image bytes into an (H, W, 3) uint8 BGR array, or raise a ``PipelineError``."""
    return decode_opened(read_header(data, max_bytes, max_pixels, max_decode_bytes))


class MemoryBudget:
    """Bytes of decodes in flight, shared by threads: :meth:`reserve` waits until the
    request fits.  A single reservation larger than the whole budget is refused up front
    (it could never fit); ``read_header``'s ``max_decode_bytes`` keeps requests under it."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = min(int(nbytes), self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + nbytes <= self.limit)
            self.in_use += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()
