"""Image decoding with size limits: encoded bytes or raw pixels -> RGB uint8 HxWx3."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own bomb guard is replaced by our explicit pixel limit, checked before decoding.
Image.MAX_IMAGE_PIXELS = None

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int
    max_pixels: int


class ImageRejected(ValueError):
    """The image cannot be used; `reason` is an ImageError.Reason suffix, e.g. UNDECODABLE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_image(
    data: bytes, limits: DecodeLimits, exact_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decodes JPEG/PNG/WebP/BMP bytes to RGB uint8, applying EXIF orientation.

    With `exact_size` (width, height), an image of any other size is refused as NOT_ALIGNED
    from its header, before any pixel is decoded."""
    _check_bytes(data, limits)
    size = _plain_jpeg_size(data, limits)
    if size is not None:
        if exact_size is not None and size != exact_size:
            raise _not_aligned(exact_size, size)
        pixels = _decode_plain_jpeg(data)
        if pixels is not None:
            return pixels
    with _opened(data, limits) as img:
        if exact_size is not None and img.size != exact_size:
            # A 90-degree EXIF rotation of a square is still that square, so the header
            # size is the size that matters.
            raise _not_aligned(exact_size, img.size)
        return _pixels(img)


def _not_aligned(exact_size: tuple[int, int], size: tuple[int, int]) -> ImageRejected:
    return ImageRejected(
        "NOT_ALIGNED",
        f"an aligned face crop must be {exact_size[0]}x{exact_size[1]}, got "
        f"{size[0]}x{size[1]}: send alignment=detect (the default) for photos, or a "
        f"{exact_size[0]}x{exact_size[1]} crop (or 5 landmarks)",
    )


def decode_reduced(data: bytes, limits: DecodeLimits, max_side: int) -> tuple[np.ndarray, float]:
    """Decodes for face detection: a JPEG whose long side is over twice `max_side` is decoded
    at 1/2, 1/4 or 1/8 scale (never below `max_side`), costing a fraction of a full decode.
    Returns the pixels and the factor from their coordinates to the original image's."""
    _check_bytes(data, limits)
    size = _plain_jpeg_size(data, limits)
    if size is not None and max(size) <= 2 * max_side:
        pixels = _decode_plain_jpeg(data)
        if pixels is not None:
            return pixels, 1.0
    with _opened(data, limits) as img:
        width, height = img.size
        long_side = max(width, height)
        if img.format == "JPEG" and long_side > 2 * max_side:
            ratio = max_side / long_side
            img.draft("RGB", (max(1, int(width * ratio)), max(1, int(height * ratio))))
        factor = long_side / max(img.size)
        return _pixels(img), factor


@contextlib.contextmanager
def _opened(data: bytes, limits: DecodeLimits) -> Iterator[Image.Image]:
    """The image with only its header read, its byte and pixel counts checked; errors while
    reading or decoding it become UNDECODABLE."""
    _check_bytes(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            # The header gives the size without decoding: refuse bombs before allocating.
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageRejected(
                    "TOO_MANY_PIXELS",
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"the limit is {limits.max_pixels} (max_image_pixels)",
                )
            yield img
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(
            "UNDECODABLE",
            f"not a decodable JPEG/PNG/WebP/BMP image ({len(data)} bytes): unrecognised format",
        ) from None
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageRejected(
            "UNDECODABLE", f"not a decodable JPEG/PNG/WebP/BMP image ({len(data)} bytes): {exc}"
        ) from None


def _check_bytes(data: bytes, limits: DecodeLimits) -> None:
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            "TOO_MANY_BYTES",
            f"image is {len(data)} bytes, the limit is {limits.max_bytes} (max_image_bytes)",
        )
    if not data:
        raise ImageRejected("UNDECODABLE", "image is empty (0 bytes)")


def _plain_jpeg_size(data: bytes, limits: DecodeLimits) -> tuple[int, int] | None:
    """(width, height) of a colour JPEG without EXIF, from its header, its pixel count
    checked; None sends the image down the Pillow path, which handles EXIF orientation,
    grey/CMYK and reports corrupt data."""
    if not data.startswith(b"\xff\xd8") or _jpeg_may_have_exif(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:  # any complaint: Pillow decodes or reports it
        return None
    if colorspace != "YCbCr":
        return None
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "TOO_MANY_PIXELS",
            f"image is {width}x{height} = {width * height} pixels, "
            f"the limit is {limits.max_pixels} (max_image_pixels)",
        )
    return width, height


def _decode_plain_jpeg(data: bytes) -> np.ndarray | None:
    """libjpeg-turbo straight into numpy (simplejpeg): the same pixels as Pillow (same
    library, same defaults) at 1.2-3.5x the speed (make bench, bench_decode.py); None on any
    complaint, so Pillow decodes or reports it."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except Exception:
        return None


def _jpeg_may_have_exif(data: bytes) -> bool:
    """Walks the JPEG segments before the first scan; True on an EXIF APP1 segment or on
    anything unexpected (the caller then lets Pillow decide)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return True
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: no metadata segments follow
            return False
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            return True
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return True


def _pixels(img: Image.Image) -> np.ndarray:
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = _to_rgb(img)
    return np.asarray(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black, matching what RGB conversion of a premultiplied image shows.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray((arr * (255.0 / peak)).round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def raw_image(height: int, width: int, data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Wraps caller-supplied HxWx3 RGB pixels (size already validated) without copying."""
    if height * width > limits.max_pixels:
        raise ImageRejected(
            "TOO_MANY_PIXELS",
            f"image is {width}x{height} = {width * height} pixels, "
            f"the limit is {limits.max_pixels} (max_image_pixels)",
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
