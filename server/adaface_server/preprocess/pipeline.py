"""Per-image preprocessing: source -> aligned 112x112 RGB crop -> NCHW model input tensor."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image

from .align import AlignmentError, align_face, align_with
from .decode import DecodeLimits, ImageRejected, decode_image, decode_reduced, raw_image
from .detect import MTCNN, DetectParams, Face, Selection

CROP_SIZE = 112


class AlignMode(Enum):
    ALIGNED = "aligned"
    LANDMARKS = "landmarks"
    DETECT = "detect"


@dataclass(frozen=True)
class ImageItem:
    """One image as the caller sent it; exactly one of `encoded` / `raw` is set."""

    encoded: bytes | None = None
    raw: tuple[int, int, bytes] | None = None  # (height, width, RGB bytes)
    mode: AlignMode = AlignMode.ALIGNED
    landmarks: np.ndarray | None = None  # (5, 2) float, source pixel coordinates


def load_pixels(item: ImageItem, limits: DecodeLimits) -> np.ndarray:
    if item.encoded is not None:
        return decode_image(item.encoded, limits)
    assert item.raw is not None
    return raw_image(*item.raw, limits)


def face_crop(item: ImageItem, limits: DecodeLimits) -> np.ndarray:
    """Returns the 112x112x3 RGB uint8 crop for ALIGNED / LANDMARKS items."""
    if item.mode is AlignMode.ALIGNED:
        # The size comes from the header (or the raw dimensions): nothing else is decoded.
        if item.encoded is not None:
            return decode_image(item.encoded, limits, exact_size=(CROP_SIZE, CROP_SIZE))
        assert item.raw is not None
        h, w = item.raw[:2]
        if (h, w) != (CROP_SIZE, CROP_SIZE):
            raise ImageRejected(
                "NOT_ALIGNED",
                f"an aligned face crop must be {CROP_SIZE}x{CROP_SIZE}, got {w}x{h}: send "
                "alignment=detect (the default) for photos, or a "
                f"{CROP_SIZE}x{CROP_SIZE} crop (or 5 landmarks)",
            )
        return raw_image(*item.raw, limits)
    pixels = load_pixels(item, limits)
    if item.mode is AlignMode.LANDMARKS:
        try:
            return align_face(pixels, item.landmarks)
        except AlignmentError as exc:
            raise ImageRejected("ALIGNMENT_FAILED", str(exc)) from None
    raise ValueError(f"face_crop does not handle {item.mode}")


@dataclass(frozen=True)
class FaceCrop:
    """A detected face and its aligned 112x112x3 RGB crop."""

    face: Face
    crop: np.ndarray


def select_faces(faces: list[Face], selection: Selection) -> list[Face]:
    """Applies the request's selection to faces sorted best score first."""
    if not faces or selection is Selection.ALL:
        return faces
    if selection is Selection.LARGEST:
        return [max(faces, key=lambda f: f.area)]
    return [faces[0]]


@dataclass(frozen=True)
class DecodedPhoto:
    """A photo decoded for detection; `factor` maps its pixels back to the original's."""

    pixels: np.ndarray
    factor: float = 1.0


def decode_for_detection(item: ImageItem, limits: DecodeLimits, max_side: int) -> DecodedPhoto:
    """Large JPEGs decode at reduced scale: detection runs at max_side anyway."""
    if item.encoded is not None:
        return DecodedPhoto(*decode_reduced(item.encoded, limits, max_side))
    return DecodedPhoto(load_pixels(item, limits))


def detect_crops_many(
    photos: list[DecodedPhoto], detector: MTCNN, params: DetectParams
) -> list[list[FaceCrop] | ImageRejected]:
    """Detects, selects and aligns the faces of several photos, the detector's nets batched
    across them; each photo's crops, or ImageRejected (NO_FACE, ALIGNMENT_FAILED)."""
    reduced = [
        dataclasses.replace(params, min_face_size=params.min_face_size / p.factor) for p in photos
    ]
    found = detector.detect_many([p.pixels for p in photos], reduced)
    out: list[list[FaceCrop] | ImageRejected] = []
    for photo, faces in zip(photos, found, strict=True):
        try:
            out.append(_aligned_faces(photo, select_faces(faces, params.selection), params))
        except ImageRejected as exc:
            out.append(exc)
    return out


def detect_crops(
    item: ImageItem, limits: DecodeLimits, detector: MTCNN, params: DetectParams
) -> list[FaceCrop]:
    """Detects, selects and aligns faces; ImageRejected(NO_FACE) when none is usable."""
    photo = decode_for_detection(item, limits, detector.max_side)
    (result,) = detect_crops_many([photo], detector, params)
    if isinstance(result, ImageRejected):
        raise result
    return result


def _aligned_faces(photo: DecodedPhoto, faces: list[Face], params: DetectParams) -> list[FaceCrop]:
    if not faces:
        height, width = (round(n * photo.factor) for n in photo.pixels.shape[:2])
        raise ImageRejected(
            "NO_FACE",
            f"no face found in the {width}x{height} image (min_face_size "
            f"{params.min_face_size:g} px, min_score {params.min_score:g})",
        )
    out = []
    for face in faces:
        try:
            # Warped from the decoded pixels: full resolution, or for a large JPEG at least
            # max_side on the long side, finer than the downscaled copy detection ran on.
            crop = align_with(photo.pixels, face.landmarks, params.align_method)
            out.append(FaceCrop(_scaled(face, photo.factor), crop))
        except AlignmentError as exc:
            if len(faces) == 1:
                raise ImageRejected("ALIGNMENT_FAILED", f"detected face: {exc}") from None
    return out


def _scaled(face: Face, factor: float) -> Face:
    """The face in the original image's coordinates, from those of a reduced decode."""
    if factor == 1.0:
        return face
    return Face(box=face.box * factor, score=face.score, landmarks=face.landmarks * factor)


def png_bytes(crop: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="PNG")
    return buffer.getvalue()


def normalise(pixels: np.ndarray) -> np.ndarray:
    """(x/255-0.5)/0.5 in float32: the arithmetic of AdaFace's to_input, for any shape.

    The server applies it to fp32-input models; uint8-input exports apply the same values
    inside their graph (a table built by this function, see models/export.py)."""
    return (pixels.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)


def to_model_input(
    crops: list[np.ndarray], flip: bool, channel_order: str = "BGR", dtype: str = "fp32"
) -> np.ndarray:
    """Stacks RGB crops into model input, NCHW and C-contiguous, in the model's input dtype
    (ModelSpec.input_dtype): "fp32" = normalise()d float32, "uint8" = the pixels as they are
    (the model normalises them itself, and the tensor is 4x smaller).

    channel_order is the model's (ModelSpec.channel_order): "BGR" for AdaFace models, "RGB"
    for InsightFace arcface_torch ones. This is the only place the order is applied, so
    every backend receives the tensor its model was trained on.

    With `flip`, row 2i is crop i and row 2i+1 its horizontal mirror, so both views of an
    image stay adjacent and travel in the same batch.
    """
    if dtype not in ("fp32", "uint8"):
        raise ValueError(f"dtype must be 'fp32' or 'uint8', got {dtype!r}")
    batch = np.stack(crops)  # N,H,W,3 RGB
    if flip:
        batch = np.stack([batch, batch[:, :, ::-1]], axis=1).reshape(-1, *batch.shape[1:])
    if channel_order == "BGR":
        batch = batch[..., ::-1]
    elif channel_order != "RGB":
        raise ValueError(f"channel_order must be 'BGR' or 'RGB', got {channel_order!r}")
    nchw = batch.transpose(0, 3, 1, 2)
    # A non-contiguous tensor made conv2d ~40x slower on this CPU (see notes).
    if dtype == "uint8":
        return np.ascontiguousarray(nchw, dtype=np.uint8)
    return np.ascontiguousarray(normalise(nchw))
