"""to_model_input: the one place crops become the model's tensor, in its channel order."""

from __future__ import annotations

import numpy as np
import pytest

from adaface_server.preprocess.pipeline import normalise, to_model_input


def crops() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]


def scaled(channel: np.ndarray) -> np.ndarray:
    return (channel.astype(np.float64) / 255.0 - 0.5) / 0.5


@pytest.mark.parametrize("order", ["BGR", "RGB"])
def test_channels_follow_the_models_order(order):
    images = crops()
    out = to_model_input(images, flip=False, channel_order=order)
    assert out.dtype == np.float32 and out.shape == (2, 3, 112, 112)
    assert out.flags["C_CONTIGUOUS"]
    picks = (2, 1, 0) if order == "BGR" else (0, 1, 2)
    for i, image in enumerate(images):
        for plane, channel in enumerate(picks):
            np.testing.assert_allclose(out[i, plane], scaled(image[..., channel]), atol=1e-6)


def test_default_is_adafaces_bgr():
    images = crops()
    np.testing.assert_array_equal(
        to_model_input(images, flip=False), to_model_input(images, False, "BGR")
    )
    assert not np.array_equal(
        to_model_input(images, flip=False), to_model_input(images, False, "RGB")
    )


def test_flip_rows_are_mirrors_in_the_same_order():
    images = crops()
    out = to_model_input(images, flip=True, channel_order="RGB")
    assert out.shape == (4, 3, 112, 112)
    np.testing.assert_array_equal(out[0::2], to_model_input(images, False, "RGB"))
    np.testing.assert_array_equal(out[1::2], out[0::2][..., ::-1])


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="'GBR'"):
        to_model_input(crops(), flip=False, channel_order="GBR")


@pytest.mark.parametrize("order", ["BGR", "RGB"])
@pytest.mark.parametrize("flip", [False, True])
def test_uint8_input_is_the_pixels_the_fp32_input_normalises(order, flip):
    """dtype uint8 (models that normalise inside their graph): same layout, order and flip
    rows as fp32, the values left as pixels, a quarter of the bytes."""
    images = crops()
    pixels = to_model_input(images, flip, order, "uint8")
    floats = to_model_input(images, flip, order, "fp32")
    assert pixels.dtype == np.uint8 and pixels.shape == floats.shape
    assert pixels.flags["C_CONTIGUOUS"] and pixels.nbytes * 4 == floats.nbytes
    assert pixels[0].nbytes == 112 * 112 * 3 == 37_632
    np.testing.assert_array_equal(normalise(pixels), floats)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="'fp16'"):
        to_model_input(crops(), flip=False, dtype="fp16")
