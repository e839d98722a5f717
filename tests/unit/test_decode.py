"""Decoding: formats, EXIF orientation, mode conversion, byte and pixel limits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from adaface_server.preprocess.decode import DecodeLimits, ImageRejected, decode_image

LIMITS = DecodeLimits(max_bytes=1_000_000, max_pixels=1_000_000)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(h: int = 40, w: int = 60) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_round_trip_exactly(fmt):
    arr = pattern()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(Image.fromarray(arr), fmt, **kw), LIMITS)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_jpeg_decodes_to_rgb():
    arr = np.full((32, 48, 3), (200, 30, 90), np.uint8)
    out = decode_image(encode(Image.fromarray(arr), "JPEG", quality=95), LIMITS)
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - arr).max() <= 3


def test_exif_orientation_is_applied():
    arr = pattern(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode(Image.fromarray(arr), "PNG", exif=exif)
    out = decode_image(data, LIMITS)
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))


def test_grey_and_rgba_become_rgb():
    grey = (np.arange(600) % 256).astype(np.uint8).reshape(20, 30)
    out = decode_image(encode(Image.fromarray(grey, "L"), "PNG"), LIMITS)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # fully transparent pixel becomes black
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS)
    assert out.shape == (4, 4, 3)
    assert tuple(out[1, 1]) == (255, 0, 0) and tuple(out[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "empty (0 bytes)"),
        (b"not an image at all", "not a decodable"),
        (encode(Image.fromarray(pattern()), "PNG")[:100], "not a decodable"),
        (encode(Image.fromarray(pattern()), "GIF"), "not a decodable"),
    ],
)
def test_bad_bytes_are_undecodable(data, needle):
    with pytest.raises(ImageRejected) as err:
        decode_image(data, LIMITS)
    assert err.value.reason == "UNDECODABLE"
    assert needle in str(err.value)


def test_byte_limit_names_size_and_limit():
    data = encode(Image.fromarray(pattern()), "PNG")
    with pytest.raises(ImageRejected) as err:
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1, max_pixels=10**9))
    assert err.value.reason == "TOO_MANY_BYTES"
    assert f"{len(data)} bytes" in str(err.value) and f"limit is {len(data) - 1}" in str(err.value)


def png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (pixels never stored)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageRejected) as err:
        decode_image(png_bomb(50_000, 50_000), LIMITS)
    assert err.value.reason == "TOO_MANY_PIXELS"
    assert "50000x50000 = 2500000000 pixels" in str(err.value)
