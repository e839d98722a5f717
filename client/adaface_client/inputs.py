"""Input preparation: images of any supported kind, landmarks and alignment to ImageInput."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np

from adaface.v1 import common_pb2

__all__ = ["AlignmentLike", "ImageLike", "LandmarksLike", "make_image_input"]

# What `images` may hold: a file path, encoded bytes, a PIL image, an HxWx3 uint8 RGB array,
# or a ready ImageInput message (sent unchanged).
ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Any]  # noqa: UP007
LandmarksLike = Union[Sequence[float], np.ndarray, None]  # noqa: UP007
AlignmentLike = Union[int, str, None]  # noqa: UP007

_ALIGNMENT_ALIASES = {
    "unspecified": common_pb2.ALIGNMENT_UNSPECIFIED,
    "aligned": common_pb2.ALIGNMENT_ALIGNED,
    "landmarks": common_pb2.ALIGNMENT_LANDMARKS,
    "detect": common_pb2.ALIGNMENT_DETECT,
}
_MAX_SIDE = 65535


def _parse_alignment(alignment: AlignmentLike) -> int | None:
    if alignment is None:
        return None
    if isinstance(alignment, str):
        key = alignment.lower().removeprefix("alignment_")
        if key not in _ALIGNMENT_ALIASES:
            raise ValueError(
                f"unknown alignment {alignment!r}; use one of {sorted(_ALIGNMENT_ALIASES)}"
            )
        return _ALIGNMENT_ALIASES[key]
    if isinstance(alignment, bool) or not isinstance(alignment, (int, np.integer)):
        raise TypeError(f"alignment must be a str or an Alignment value, got {type(alignment)}")
    if int(alignment) not in common_pb2.Alignment.values():
        raise ValueError(f"unknown alignment value {int(alignment)}")
    return int(alignment)


def _parse_landmarks(landmarks: LandmarksLike) -> list[float] | None:
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, bytes)):
        raise TypeError("landmarks must be 10 numbers or a (5, 2) array, got a string")
    try:
        arr = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"landmarks must be 10 numbers or a (5, 2) array: {e}") from None
    if arr.shape not in ((10,), (5, 2)):
        raise ValueError(
            "landmarks must be 10 numbers (x1,y1,...,x5,y5) or a (5, 2) array, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("landmarks must be finite numbers")
    return arr.reshape(10).tolist()


def _is_pil_image(image: object) -> bool:
    # Only an imported PIL can have made a PIL image: no import needed to check.
    pil_image = sys.modules.get("PIL.Image")
    return pil_image is not None and isinstance(image, pil_image.Image)


def _check_image(image: object, what: str) -> None:
    """Type, shape and size checks that need no file reads and no pixel copies."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{what} must have dtype uint8 (RGB 0..255), got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what} must be an HxWx3 RGB array, got shape {image.shape}")
        height, width = image.shape[:2]
    elif _is_pil_image(image):
        width, height = image.size  # type: ignore[attr-defined]
    else:
        raise TypeError(
            f"{what}: unsupported image type {type(image).__name__}: pass a file path, "
            "encoded bytes, a PIL.Image.Image, an HxWx3 uint8 RGB numpy array, "
            "or an adaface.v1 ImageInput"
        )
    if not (1 <= height <= _MAX_SIDE and 1 <= width <= _MAX_SIDE):
        raise ValueError(f"{what} must be 1..{_MAX_SIDE} pixels on each side, got {width}x{height}")


def _alignment_and_points(
    landmarks: LandmarksLike, alignment: AlignmentLike
) -> tuple[int, list[float] | None]:
    points = _parse_landmarks(landmarks)
    mode = _parse_alignment(alignment)
    if mode is None:
        # A plain image is a photo: the server detects its best face. Crops say "aligned".
        mode = common_pb2.ALIGNMENT_LANDMARKS if points is not None else common_pb2.ALIGNMENT_DETECT
    if mode == common_pb2.ALIGNMENT_LANDMARKS and points is None:
        raise ValueError("alignment LANDMARKS needs landmarks for the image")
    if points is not None and mode not in (
        common_pb2.ALIGNMENT_LANDMARKS,
        common_pb2.ALIGNMENT_UNSPECIFIED,
    ):
        raise ValueError(
            f"landmarks were given but alignment is {common_pb2.Alignment.Name(mode)}; "
            "landmarks are only used with ALIGNMENT_LANDMARKS"
        )
    return mode, points


def make_image_input(
    image: ImageLike, *, landmarks: LandmarksLike = None, alignment: AlignmentLike = None
) -> common_pb2.ImageInput:
    """Convert one image (path, encoded bytes, PIL image, HxWx3 uint8 RGB array) to ImageInput.

    Paths are read and sent as-is; PIL images and arrays go as exact RGB pixels. Alignment
    defaults to LANDMARKS when landmarks are given, DETECT otherwise (a photo: the server
    finds its best face); pre-aligned 112x112 crops need alignment="aligned". Raises TypeError for
    an unsupported type, ValueError for a bad shape, size or combination.
    """
    if isinstance(image, common_pb2.ImageInput):
        raise TypeError(
            "an ImageInput message is sent as given; pass it straight to embed()/embed_results()"
        )
    _check_image(image, "image")
    mode, points = _alignment_and_points(landmarks, alignment)
    msg = common_pb2.ImageInput(alignment=mode, landmarks=points or ())
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            msg.encoded = f.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        msg.encoded = bytes(image)
    else:
        # Raw pixels, not a re-encode: exact, and cheaper than PNG encoding on the client.
        if _is_pil_image(image) and image.mode != "RGB":  # type: ignore[union-attr]
            image = image.convert("RGB")  # type: ignore[union-attr]
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        height, width = pixels.shape[:2]
        msg.raw.CopyFrom(common_pb2.RawImage(height=height, width=width, data=pixels.tobytes()))
    return msg


def _prepared(
    images: Iterable[ImageLike], landmarks: Iterable[LandmarksLike] | None, alignment: Any
) -> Iterator[common_pb2.ImageInput]:
    """Validates what it can up front, then converts lazily so files are read only as
    requests go out. Caller-built ImageInput messages pass unchanged."""
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or _is_pil_image(images):
        raise TypeError("images must be a sequence of images (wrap a single image in a list)")
    sized = isinstance(images, Sequence)
    if isinstance(alignment, (str, int, np.integer)) or alignment is None:
        alignments: Iterable[Any] = itertools.repeat(alignment)
    else:
        alignments = alignment
        if sized and isinstance(alignment, Sequence) and len(alignment) != len(images):
            raise ValueError(f"alignment has {len(alignment)} entries for {len(images)} images")
    if landmarks is None:
        marks: Iterable[Any] = itertools.repeat(None)
    else:
        marks = landmarks
        if sized and isinstance(landmarks, Sequence) and len(landmarks) != len(images):
            raise ValueError(f"landmarks has {len(landmarks)} entries for {len(images)} images")
    items = _zip_exact(images, marks, alignments)
    if sized:
        # Catch a bad input before any request goes out, not after half the work is done.
        items = list(items)
        for i, (image, lm, mode) in enumerate(items):
            _check_item(i, image, lm, mode)
    for i, (image, lm, mode) in enumerate(items):
        if isinstance(image, common_pb2.ImageInput):
            _check_item(i, image, lm, mode)
            yield image
            continue
        try:
            yield make_image_input(image, landmarks=lm, alignment=mode)
        except (TypeError, ValueError) as e:
            raise type(e)(f"images[{i}]: {e}") from None


def _zip_exact(
    images: Iterable[Any], marks: Iterable[Any], alignments: Iterable[Any]
) -> Iterator[tuple[Any, Any, Any]]:
    sentinel = object()
    mark_it, align_it = iter(marks), iter(alignments)
    for i, image in enumerate(images):
        lm, mode = next(mark_it, sentinel), next(align_it, sentinel)
        if lm is sentinel:
            raise ValueError(f"landmarks ran out at image {i}")
        if mode is sentinel:
            raise ValueError(f"alignment ran out at image {i}")
        yield image, lm, mode


def _check_item(i: int, image: Any, lm: Any, mode: Any) -> None:
    if isinstance(image, common_pb2.ImageInput):
        if lm is not None:
            raise ValueError(
                f"images[{i}] is an ImageInput message: set its landmarks field instead"
            )
        return
    try:
        _check_image(image, "image")
        _alignment_and_points(lm, mode)
    except (TypeError, ValueError) as e:
        raise type(e)(f"images[{i}]: {e}") from None
