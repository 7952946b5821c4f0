"""decode_image: every refusal is typed and happens before decoding; accepted formats decode
right."""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from service.pipeline import decode as decode_module
from service.pipeline.decode import MemoryBudget, decode_image
from service.pipeline.errors import (
    CorruptImage,
    DecodeTooLarge,
    EmptyImage,
    ImageTooLarge,
    PipelineError,
    TooManyPixels,
    UnsupportedImageType,
)
from tests.conftest import LFW

MB = 1 << 20
LIMITS = {"max_bytes": 10 * MB, "max_pixels": 40_000_000}
PHOTO = LFW / "images" / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    return PHOTO.read_bytes()


@pytest.fixture(scope="module")
def photo_rgb() -> np.ndarray:
    """A real LFW photo as RGB uint8 with a coloured patch so channel order is checkable."""
    rgb = np.array(Image.open(PHOTO).convert("RGB"))
    rgb[10:40, 10:60] = (255, 0, 0)  # pure red patch, top-left
    return rgb


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_with_header(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def assert_refused(data: bytes, error: type[PipelineError], status: int, code: str, **limits):
    with pytest.raises(error) as info:
        decode_image(data, **{**LIMITS, **limits})
    assert info.value.status == status and info.value.code == code
    assert str(info.value)


def test_real_jpeg_matches_opencv(jpeg_bytes):
    image = decode_image(jpeg_bytes, **LIMITS)
    assert image.shape == (250, 250, 3) and image.dtype == np.uint8
    reference = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 1.0


def test_zero_bytes():
    assert_refused(b"", EmptyImage, 400, "empty_image")


def test_text_is_unsupported():
    assert_refused(
        b"name,age\nalice,30\n" * 10, UnsupportedImageType, 415, "unsupported_image_type"
    )


def test_gif_and_pdf_are_unsupported(photo_rgb):
    assert_refused(encode(photo_rgb, "GIF"), UnsupportedImageType, 415, "unsupported_image_type")
    assert_refused(
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
        UnsupportedImageType,
        415,
        "unsupported_image_type",
    )


def test_over_byte_limit(jpeg_bytes):
    assert_refused(jpeg_bytes, ImageTooLarge, 413, "image_too_large", max_bytes=len(jpeg_bytes) - 1)
    assert decode_image(jpeg_bytes, max_bytes=len(jpeg_bytes), max_pixels=10**6).shape[0] == 250


def test_truncated_jpeg(jpeg_bytes):
    assert_refused(jpeg_bytes[: len(jpeg_bytes) // 2], CorruptImage, 400, "corrupt_image")
    assert_refused(jpeg_bytes[:20], CorruptImage, 400, "corrupt_image")


def test_truncated_png(photo_rgb):
    data = encode(photo_rgb, "PNG")
    assert_refused(data[: len(data) // 2], CorruptImage, 400, "corrupt_image")
    assert_refused(data[:30], CorruptImage, 400, "corrupt_image")


def test_truncated_webp(photo_rgb):
    for kwargs in ({"quality": 80}, {"lossless": True}):
        data = encode(photo_rgb, "WEBP", **kwargs)
        assert_refused(data[: len(data) // 2], CorruptImage, 400, "corrupt_image")
        assert_refused(data[:30], CorruptImage, 400, "corrupt_image")
        assert_refused(data[:12], CorruptImage, 400, "corrupt_image")  # RIFF....WEBP only


def test_corrupt_webp(photo_rgb):
    lossy = bytearray(encode(photo_rgb, "WEBP", quality=80))
    assert lossy[12:16] == b"VP8 " and lossy[23:26] == b"\x9d\x01\x2a"
    lossy[23:26] = b"\x00\x00\x00"  # the VP8 key frame's start code
    assert_refused(bytes(lossy), CorruptImage, 400, "corrupt_image")
    lossless = bytearray(encode(photo_rgb, "WEBP", lossless=True))
    assert lossless[12:16] == b"VP8L" and lossless[20] == 0x2F
    garbage = np.random.default_rng(0).integers(0, 256, len(lossless) - 30, dtype=np.uint8)
    lossless[30:] = garbage.tobytes()  # a valid header over a garbage bitstream
    assert_refused(bytes(lossless), CorruptImage, 400, "corrupt_image")
    lossless[20] = 0  # the VP8L signature byte
    assert_refused(bytes(lossless), CorruptImage, 400, "corrupt_image")


def test_truncated_bmp(photo_rgb):
    data = encode(photo_rgb, "BMP")
    assert_refused(data[: len(data) // 2], CorruptImage, 400, "corrupt_image")
    assert_refused(data[:30], CorruptImage, 400, "corrupt_image")  # inside the info header
    assert_refused(data[:14], CorruptImage, 400, "corrupt_image")  # the file header only


def test_corrupt_bmp(photo_rgb):
    data = encode(photo_rgb, "BMP")
    assert data[14:18] == struct.pack("<I", 40)  # BITMAPINFOHEADER
    for offset, field, message in [
        (28, struct.pack("<H", 7), "pixel depth"),
        (14, struct.pack("<I", 99), "header"),
        (10, struct.pack("<I", 10**7), "truncated"),
        (18, struct.pack("<i", 0), "header"),
    ]:
        corrupt = bytearray(data)
        corrupt[offset : offset + len(field)] = field
        with pytest.raises(CorruptImage, match=message) as info:
            decode_image(bytes(corrupt), **LIMITS)
        assert "BytesIO" not in str(info.value)  # no in-memory object in the message


def test_webp_and_bmp_headers_over_the_pixel_limit(photo_rgb):
    lossy = bytearray(encode(photo_rgb, "WEBP", quality=80))
    lossy[26:30] = struct.pack("<HH", 10000, 10000)  # VP8 frame width, height (14 bits)
    lossless = bytearray(encode(photo_rgb, "WEBP", lossless=True))
    bits = struct.unpack("<I", lossless[21:25])[0] & ~((1 << 28) - 1)
    lossless[21:25] = struct.pack("<I", bits | (8000 - 1) | ((8000 - 1) << 14))  # VP8L
    animated = io.BytesIO()
    Image.fromarray(photo_rgb).save(
        animated,
        format="WEBP",
        save_all=True,
        lossless=True,
        append_images=[Image.fromarray(255 - photo_rgb)],
    )
    extended = bytearray(animated.getvalue())
    assert extended[12:16] == b"VP8X"
    extended[24:30] = (20000 - 1).to_bytes(3, "little") * 2  # the VP8X canvas
    bmp = bytearray(encode(photo_rgb, "BMP"))
    bmp[18:26] = struct.pack("<ii", 10000, 10000)
    top_down = bytearray(bmp)
    top_down[22:26] = struct.pack("<i", -10000)
    for data in (lossy, lossless, extended, bmp, top_down):
        start = time.perf_counter()
        assert_refused(bytes(data), TooManyPixels, 413, "too_many_pixels")
        assert time.perf_counter() - start < 0.5  # from the header, nothing allocated


MUTATIONS_PER_FORMAT = 100


def mutations(data: bytes, rng: random.Random, count: int):
    """Deterministic truncations, byte flips anywhere and byte flips in the headers."""
    for i in range(count):
        mutated = bytearray(data)
        if i % 3 == 0:
            yield bytes(mutated[: rng.randrange(1, len(mutated))])
            continue
        span = len(mutated) if i % 3 == 1 else min(64, len(mutated))
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(span)] ^= rng.randrange(1, 256)
        yield bytes(mutated)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # corrupt EXIF
def test_mutated_images_raise_only_typed_errors():
    """Hundreds of damaged JPEG/PNG/WebP/BMP files of a real photo: each decodes to a
    3-channel 8-bit image or raises a ``PipelineError``, never anything else."""
    face = Image.open(PHOTO).convert("RGB").crop((60, 60, 190, 190)).resize((96, 96))
    exif = Image.Exif()
    exif[0x0112] = 6
    sources = {
        "JPEG": encode(np.asarray(face), "JPEG", quality=90, exif=exif.tobytes()),
        "PNG": encode(np.asarray(face.convert("RGBA")), "PNG"),
        "WEBP": encode(np.asarray(face), "WEBP", quality=80),
        "WEBP lossless": encode(np.asarray(face), "WEBP", lossless=True),
        "BMP": encode(np.asarray(face), "BMP"),
    }
    rng = random.Random(20261202)
    outcomes = {"decoded": 0, "refused": 0}
    start = time.perf_counter()
    for name, data in sources.items():
        for k, mutated in enumerate(mutations(data, rng, MUTATIONS_PER_FORMAT)):
            try:
                image = decode_image(mutated, **LIMITS)
            except PipelineError as exc:
                assert exc.status in (400, 413, 415) and str(exc), (name, k)
                outcomes["refused"] += 1
            except Exception as exc:  # noqa: BLE001 - exactly what this test looks for
                pytest.fail(f"{name} mutation {k}: {type(exc).__name__}: {exc}")
            else:
                assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
                outcomes["decoded"] += 1
    elapsed = time.perf_counter() - start
    assert sum(outcomes.values()) == len(sources) * MUTATIONS_PER_FORMAT
    assert outcomes["refused"] >= 100 and outcomes["decoded"] >= 10, outcomes
    assert elapsed < 20, elapsed


def test_png_decompression_bomb_refused_from_header():
    # 12000 x 12000 zero pixels deflate to ~140 KB but would need 144 MB decoded.
    width = height = 12000
    idat = zlib.compress(b"\x00" * ((width + 1) * height), 9)
    data = png_with_header(width, height, idat)
    assert len(data) < 1 * MB
    start = time.perf_counter()
    assert_refused(data, TooManyPixels, 413, "too_many_pixels")
    assert time.perf_counter() - start < 0.5  # refused before any pixel is inflated


def test_huge_dimensions_in_header(jpeg_bytes):
    # A PNG header declaring 60000 x 60000 (beyond Pillow's own bomb limit too) ...
    assert_refused(
        png_with_header(60000, 60000, zlib.compress(b"\x00" * 10)),
        TooManyPixels,
        413,
        "too_many_pixels",
    )
    # ... and a real JPEG whose SOF0 frame header is rewritten to 30000 x 30000.
    data = bytearray(jpeg_bytes)
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    assert_refused(bytes(data), TooManyPixels, 413, "too_many_pixels")
    # The limit is the caller's: a real photo over a small pixel budget is refused too.
    assert_refused(jpeg_bytes, TooManyPixels, 413, "too_many_pixels", max_pixels=250 * 250 - 1)


def test_exif_orientation_is_applied():
    # Left half white, right half black, 120 wide x 60 high; EXIF 6 = display rotated 90° clockwise.
    stored = np.zeros((60, 120, 3), np.uint8)
    stored[:, :60] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data, **LIMITS)
    assert image.shape == (120, 60, 3)
    expected = np.rot90(stored, k=-1)  # clockwise: the white half ends up on top
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 3
    assert image[:50].mean() > 240 and image[70:].mean() < 15


def test_grayscale_png_is_three_channel(photo_rgb):
    gray = np.array(Image.fromarray(photo_rgb).convert("L"))
    image = decode_image(encode(gray, "PNG"), **LIMITS)
    assert image.shape == (250, 250, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_rgba_png_drops_alpha_onto_black(photo_rgb):
    rgba = np.dstack([photo_rgb, np.full(photo_rgb.shape[:2], 255, np.uint8)])
    rgba[:, 125:, 3] = 0  # right half fully transparent
    image = decode_image(encode(rgba, "PNG"), **LIMITS)
    assert image.shape == (250, 250, 3)
    np.testing.assert_array_equal(image[:, :125], photo_rgb[:, :125, ::-1])
    assert image[:, 125:].max() == 0


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    image = decode_image(buf.getvalue(), **LIMITS)
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    np.testing.assert_array_equal(image[:, :, 0], np.arange(256, dtype=np.uint8).reshape(16, 16))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip_to_bgr(photo_rgb, fmt):
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    image = decode_image(encode(photo_rgb, fmt, **kwargs), **LIMITS)
    np.testing.assert_array_equal(image, photo_rgb[:, :, ::-1])
    assert tuple(image[20, 20]) == (0, 0, 255)  # red patch in BGR order


def test_animated_webp_uses_first_frame(photo_rgb):
    frames = [Image.fromarray(photo_rgb), Image.fromarray(255 - photo_rgb)]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    image = decode_image(buf.getvalue(), **LIMITS)
    np.testing.assert_array_equal(image, photo_rgb[:, :, ::-1])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(photo_rgb, orientation):
    """The orientation is applied to the decoded array; Pillow's exif_transpose is the
    reference (a non-square photo, so every transpose is visible)."""
    stored = photo_rgb[:, :180]
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data, **LIMITS), expected[:, :, ::-1])


@pytest.mark.parametrize("strip", [1, 1000, 1 << 18])
def test_strip_conversion_equals_whole_image(photo_rgb, monkeypatch, strip):
    """Strips of any height give the whole-image conversion (RGBA onto black, palette)."""
    rgba = np.dstack([photo_rgb, np.arange(250 * 250, dtype=np.uint32).reshape(250, 250) % 256])
    rgba = rgba.astype(np.uint8)
    palette = Image.fromarray(photo_rgb).quantize(64)
    cases = [encode(rgba, "PNG"), encode(np.asarray(palette.convert("RGB")), "PNG")]
    monkeypatch.setattr(decode_module, "STRIP_PIXELS", strip)
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    want = ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)[:, :, ::-1]
    np.testing.assert_array_equal(decode_image(cases[0], **LIMITS), want)
    pal = np.asarray(palette.convert("RGB"))[:, :, ::-1]
    np.testing.assert_array_equal(decode_image(cases[1], **LIMITS), pal)


def test_decode_memory_limit_counts_bit_depth_and_channels():
    """Same pixels, different bytes: a 16-bit gray 5000x5000 PNG (2 B/px decoded + 3 B/px out)
    fits 170 MB, the RGBA one (at least 4 + 3 B/px) cannot, and is refused from the header."""
    gray16 = io.BytesIO()
    Image.new("I;16", (5000, 5000)).save(gray16, format="PNG")
    rgba = encode(np.zeros((5000, 5000, 4), np.uint8), "PNG")
    limit = 170_000_000
    assert 25_000_000 * (2 + 3) < limit < 25_000_000 * (4 + 3)
    image = decode_image(gray16.getvalue(), **LIMITS, max_decode_bytes=limit)
    assert image.shape == (5000, 5000, 3)
    with pytest.raises(DecodeTooLarge) as info:
        decode_image(rgba, **LIMITS, max_decode_bytes=limit)
    assert info.value.status == 413 and info.value.code == "decode_too_large"


def test_memory_budget_holds_decodes_until_they_fit():
    budget = MemoryBudget(100)
    order: list[str] = []
    with budget.reserve(70):

        def second() -> None:
            with budget.reserve(50):
                order.append("second in")

        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first out")  # the second waited: 70 + 50 > 100
    thread.join(5)
    assert order == ["first out", "second in"] and budget.in_use == 0
