"""Decode work is bounded by what the alignment mode needs: the size of an aligned crop is
read from the header, and detection decodes large JPEGs at reduced scale."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from adaface_server.preprocess.decode import (
    DecodeLimits,
    ImageRejected,
    decode_image,
    decode_reduced,
)
from adaface_server.preprocess.detect import MTCNN, DetectParams
from adaface_server.preprocess.pipeline import AlignMode, ImageItem, detect_crops, face_crop

from .test_decode import png_bomb

WEIGHTS = Path(__file__).resolve().parents[2] / ".cache" / "mtcnn"
LIMITS = DecodeLimits(max_bytes=20 << 20, max_pixels=40_000_000)


def jpeg(arr: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_an_oversized_aligned_crop_is_refused_from_its_header() -> None:
    # The header claims 6000x6000 but no pixel data follows: decoding would fail
    # (UNDECODABLE), so NOT_ALIGNED shows the size was judged before any decoding.
    item = ImageItem(encoded=png_bomb(6000, 6000), mode=AlignMode.ALIGNED)
    with pytest.raises(ImageRejected) as err:
        face_crop(item, LIMITS)
    assert err.value.reason == "NOT_ALIGNED"
    assert "got 6000x6000" in str(err.value)


def test_a_112x112_crop_still_decodes() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    crop = face_crop(ImageItem(encoded=buffer.getvalue(), mode=AlignMode.ALIGNED), LIMITS)
    np.testing.assert_array_equal(crop, pixels)
    with pytest.raises(ImageRejected) as err:
        decode_image(png_bomb(112, 112), LIMITS, exact_size=(112, 112))
    assert err.value.reason == "UNDECODABLE"  # right size, broken data


def test_detection_decodes_a_large_jpeg_at_reduced_scale() -> None:
    big = np.zeros((3000, 4000, 3), np.uint8)
    pixels, factor = decode_reduced(jpeg(big), LIMITS, max_side=1024)
    # 1/2 scale is the smallest whose long side stays at least max_side (1/4 gives 1000).
    assert factor == 2.0
    assert pixels.shape == (1500, 2000, 3)
    # Formats without reduced decoding, and JPEGs that are not large, decode in full.
    buffer = io.BytesIO()
    Image.fromarray(big[:1500, :2000]).save(buffer, format="PNG")
    assert decode_reduced(buffer.getvalue(), LIMITS, max_side=1024)[0].shape == (1500, 2000, 3)
    assert decode_reduced(jpeg(big[:1500, :2000]), LIMITS, 1024)[0].shape == (1500, 2000, 3)


def test_faces_of_a_reduced_decode_are_reported_in_original_coordinates() -> None:
    torch.set_num_threads(2)
    detector = MTCNN(WEIGHTS, max_side=512)
    astronaut = skimage.data.astronaut()
    ref = detect_crops(
        ImageItem(encoded=jpeg(astronaut), mode=AlignMode.DETECT), LIMITS, detector, DetectParams()
    )
    large = np.asarray(Image.fromarray(astronaut).resize((4096, 4096), Image.BILINEAR))
    item = ImageItem(encoded=jpeg(large), mode=AlignMode.DETECT)
    _, factor = decode_reduced(item.encoded, LIMITS, detector.max_side)
    assert factor > 1  # decoded at reduced scale
    found = detect_crops(item, LIMITS, detector, DetectParams())
    assert len(found) == len(ref) == 1
    # The same face, in the 4096-pixel image's coordinates (8x): within a few source pixels.
    assert np.abs(found[0].face.landmarks / 8 - ref[0].face.landmarks).max() < 3.0
    assert found[0].crop.shape == (112, 112, 3)
