"""The libjpeg-turbo fast path for plain colour JPEGs gives exactly Pillow's pixels, and
everything else (EXIF, grey, CMYK, corrupt data, bombs) still takes the Pillow path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from adaface_server.preprocess import decode
from adaface_server.preprocess.decode import DecodeLimits, ImageRejected, decode_image

LIMITS = DecodeLimits(max_bytes=10_000_000, max_pixels=1_000_000)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 3) % 256, (yy * 2) % 256, (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    """The reference: Pillow's own decoder, orientation and RGB conversion."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize(
    "options",
    [
        {"quality": 95},  # 4:2:0
        {"quality": 90, "subsampling": 0},  # 4:4:4
        {"quality": 75, "subsampling": 1},  # 4:2:2
        {"quality": 85, "progressive": True},
    ],
)
@pytest.mark.parametrize("shape", [(112, 112), (480, 640), (37, 53)])
def test_fast_path_equals_pillow(options, shape):
    data = jpeg(photo(*shape), **options)
    assert decode._plain_jpeg_size(data, LIMITS) == (shape[1], shape[0])
    fast = decode._decode_plain_jpeg(data)
    assert fast is not None  # the fast path was taken
    np.testing.assert_array_equal(fast, pillow_pixels(data))
    np.testing.assert_array_equal(decode_image(data, LIMITS), pillow_pixels(data))


def test_exif_grey_and_cmyk_take_the_pillow_path():
    arr = photo(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    rotated = jpeg(arr, quality=95, exif=exif)
    for data in (rotated, jpeg(arr, "L"), jpeg(arr, "CMYK")):
        assert decode._plain_jpeg_size(data, LIMITS) is None
        np.testing.assert_array_equal(decode_image(data, LIMITS), pillow_pixels(data))
    assert decode_image(rotated, LIMITS).shape == (30, 20, 3)


def test_pixel_limit_is_checked_from_the_header():
    data = jpeg(photo(100, 120))
    with pytest.raises(ImageRejected) as err:
        decode_image(data, DecodeLimits(max_bytes=10_000_000, max_pixels=100 * 119))
    assert err.value.reason == "TOO_MANY_PIXELS"
    assert "image is 120x100 = 12000 pixels, the limit is 11900" in str(err.value)


def test_corrupt_jpeg_is_reported_by_the_pillow_path():
    data = jpeg(photo(64, 64))
    with pytest.raises(ImageRejected) as err:
        decode_image(data[: len(data) // 3], LIMITS)
    assert err.value.reason == "UNDECODABLE"


def test_garbage_after_a_jpeg_marker_is_undecodable_never_a_crash():
    rng = np.random.default_rng(0)
    valid = jpeg(photo(32, 32))
    for n in range(200):
        tail = rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()
        # random bytes, and a valid header followed by random bytes
        data = b"\xff\xd8" + tail if n % 2 else valid[: 2 + n] + tail
        with pytest.raises(ImageRejected) as err:
            decode_image(data, LIMITS)
        assert err.value.reason == "UNDECODABLE"
