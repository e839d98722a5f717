"""Tests for five-point alignment: fit, warp, parity with upstream AdaFace + cv2, input errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from adaface_server.preprocess import align
from adaface_server.preprocess.align import (
    ADAFACE_TEMPLATE_112,
    ARCFACE_TEMPLATE_112,
    AlignmentError,
    AlignMethod,
    adaface_similarity,
    align_face,
    align_with,
    mtcnn_landmarks,
    norm_crop,
    parse_landmarks,
    umeyama_similarity,
    warp_affine,
    warp_affine_numpy,
)

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "align_reference.npz"
DESIGN_TEMPLATE = [
    (38.2946, 51.6963),
    (73.5318, 51.5014),
    (56.0252, 71.7366),
    (41.5493, 92.3655),
    (70.7299, 92.2041),
]


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _similarity(degrees: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(degrees)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.array(shift, dtype=np.float64).reshape(2, 1)])


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {key: z[key] for key in z.files}


@pytest.fixture(scope="module")
def astronaut(reference: dict[str, np.ndarray]) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    image = data.astronaut()
    digest = hashlib.sha256(image.tobytes()).hexdigest()
    assert digest == str(reference["meta__astronaut_sha256"]), "skimage astronaut changed"
    return image


def _case(reference: dict[str, np.ndarray], astronaut: np.ndarray, name: str):
    image = reference.get(f"{name}__image", astronaut)
    return image, reference[f"{name}__landmarks"], reference[f"{name}__matrix"]


CASES = [
    "astronaut_frontal",
    "astronaut_rotated",
    "astronaut_mirrored",
    "astronaut_partly_outside",
    "astronaut_big_face",
    "noise_upscale",
    "tiny_image",
    "quirk_branch",
]


def test_template_is_upstreams_float32_points(reference: dict[str, np.ndarray]) -> None:
    assert ADAFACE_TEMPLATE_112.dtype == np.float32
    np.testing.assert_array_equal(ADAFACE_TEMPLATE_112, reference["meta__template"])
    np.testing.assert_allclose(ADAFACE_TEMPLATE_112, DESIGN_TEMPLATE, atol=1e-4)
    assert not ADAFACE_TEMPLATE_112.flags.writeable


def test_fit_on_template_is_identity() -> None:
    matrix = adaface_similarity(ADAFACE_TEMPLATE_112)
    assert matrix.shape == (2, 3) and matrix.dtype == np.float64
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-9)


@pytest.mark.parametrize(
    ("degrees", "scale", "shift"),
    [(0.0, 1.0, (0.0, 0.0)), (17.0, 2.5, (140.0, -35.5)), (-75.0, 0.4, (3.25, 60.0))],
)
def test_fit_undoes_a_similarity(degrees: float, scale: float, shift: tuple) -> None:
    forward = _similarity(degrees, scale, shift)
    landmarks = _apply(forward, ADAFACE_TEMPLATE_112.astype(np.float64))
    matrix = adaface_similarity(landmarks)
    np.testing.assert_allclose(_apply(matrix, landmarks), ADAFACE_TEMPLATE_112, atol=1e-3)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_fit_maps_mirrored_landmarks_with_a_reflection() -> None:
    # A mirror image of a face: its left eye is the template's right eye, and so on.
    template = ADAFACE_TEMPLATE_112.astype(np.float64)
    mirrored = template * [-1.0, 1.0] + [300.0, 20.0]
    matrix = adaface_similarity(mirrored)
    assert np.linalg.det(matrix[:, :2]) < 0
    np.testing.assert_allclose(_apply(matrix, mirrored), template, atol=1e-3)


def test_dots_at_landmarks_land_on_template() -> None:
    forward = _similarity(-20.0, 2.2, (180.0, 60.0))
    landmarks = _apply(forward, ADAFACE_TEMPLATE_112.astype(np.float64))
    h, w, sigma = 480, 640, 3.0
    yy, xx = np.mgrid[0:h, 0:w]
    field = np.zeros((h, w))
    for x, y in landmarks:
        field += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    image = np.repeat((255 * np.clip(field, 0, 1)).round().astype(np.uint8)[..., None], 3, 2)

    crop = align_face(image, landmarks).astype(np.float64)[..., 0]
    assert crop.shape == (112, 112)
    cy, cx = np.mgrid[0:112, 0:112]
    for tx, ty in ADAFACE_TEMPLATE_112:
        window = (np.abs(cx - tx) <= 5) & (np.abs(cy - ty) <= 5)
        weights = crop * window
        centroid = np.array([(weights * cx).sum(), (weights * cy).sum()]) / weights.sum()
        np.testing.assert_allclose(centroid, (tx, ty), atol=0.25)
        assert crop[round(float(ty)), round(float(tx))] > 200


@pytest.mark.parametrize("name", CASES)
def test_matrix_matches_upstream(
    reference: dict[str, np.ndarray], astronaut: np.ndarray, name: str
) -> None:
    _, landmarks, upstream_matrix = _case(reference, astronaut, name)
    matrix = adaface_similarity(landmarks)
    np.testing.assert_allclose(matrix, upstream_matrix, rtol=0, atol=1e-9)
    reflective = bool(reference[f"{name}__reflective"])
    assert (np.linalg.det(matrix[:, :2]) < 0) == reflective


def test_reference_covers_the_quirk_branch(reference: dict[str, np.ndarray]) -> None:
    # Upstream compares both fits against the mirrored template (aliasing bug); on this set
    # that picks the plain fit where a correct comparison would pick the reflective one.
    assert not bool(reference["quirk_branch__reflective"])
    assert bool(reference["quirk_branch__intended_reflective"])
    assert bool(reference["astronaut_mirrored__reflective"])


@pytest.mark.parametrize("name", CASES)
def test_crop_matches_upstream_cv2(
    reference: dict[str, np.ndarray], astronaut: np.ndarray, name: str
) -> None:
    image, landmarks, upstream_matrix = _case(reference, astronaut, name)
    expected = reference[f"{name}__crop"].astype(np.int16)

    crop = align_face(image, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    diff = np.abs(crop.astype(np.int16) - expected)
    assert diff.max() <= 1, f"{name}: max {diff.max()}, mean {diff.mean():.4f}"

    # The warp alone, fed upstream's own matrix, is expected to be bit-exact: the one the
    # server uses (OpenCV's) and the numpy port it falls back to.
    np.testing.assert_array_equal(warp_affine(image, upstream_matrix), expected)
    np.testing.assert_array_equal(warp_affine_numpy(image, upstream_matrix), expected)


def test_the_server_warps_with_opencv_and_it_is_the_numpy_port() -> None:
    """OpenCV 4.x is a dependency and passes the start-up check; on 1,000 random warps of
    colour, grey and single-channel images (faces big and small, mirrored, partly or wholly
    outside) it gives exactly the numpy port's pixels."""
    assert align._opencv() is not None, "cv2 missing or refused: alignment runs the slow port"
    rng = np.random.default_rng(7)
    for i in range(1000):
        h, w = rng.integers(1, 300, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = (image, image[..., 0], image[..., :1])[i % 3]
        points = ADAFACE_TEMPLATE_112 * rng.uniform(0.05, 3.0) + rng.uniform(-80, 300, 2)
        points = points + rng.normal(0.0, 3.0, points.shape)
        if i % 5 == 0:
            points[:, 0] = w - points[:, 0]
        matrix = adaface_similarity(points)
        size = (112, 112) if i % 7 else tuple(int(v) for v in rng.integers(1, 200, 2))
        got, want = warp_affine(image, matrix, size), warp_affine_numpy(image, matrix, size)
        assert got.shape == want.shape, (i, got.shape, want.shape)
        np.testing.assert_array_equal(got, want, err_msg=f"warp {i}")


def test_partly_outside_crop_has_black_border(
    reference: dict[str, np.ndarray], astronaut: np.ndarray
) -> None:
    image, landmarks, _ = _case(reference, astronaut, "astronaut_partly_outside")
    crop = align_face(image, landmarks)
    assert (crop[0] == 0).all() and (crop[:, 0] == 0).all()
    assert crop[-1, -1].any()


def test_warp_identity_copies_pixels() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    out = warp_affine(image, [[1, 0, 0], [0, 1, 0]], size=(30, 40))
    np.testing.assert_array_equal(out, image)
    grey = warp_affine(image[..., 0], [[1, 0, -2], [0, 1, -3]], size=(10, 8))
    assert grey.shape == (8, 10)
    np.testing.assert_array_equal(grey, image[3:11, 2:12, 0])


def test_warp_shift_beyond_image_is_black() -> None:
    image = np.full((20, 20, 3), 200, dtype=np.uint8)
    out = warp_affine(image, [[1, 0, 0.5], [0, 1, 0]], size=(21, 20))
    assert (out[:, 0] == 100).all()  # half of a pixel, half of the zero border
    assert (out[:, 1:20] == 200).all()
    assert (out[:, 20] == 100).all()


def test_flat_interleaved_and_mtcnn_layouts() -> None:
    points = ADAFACE_TEMPLATE_112.astype(np.float64) * 1.5 + 7.0
    np.testing.assert_array_equal(parse_landmarks(points.reshape(-1)), parse_landmarks(points))
    mtcnn = np.concatenate([points[:, 0], points[:, 1]])
    np.testing.assert_array_equal(mtcnn_landmarks(mtcnn), parse_landmarks(points))
    assert parse_landmarks(points.tolist()).dtype == np.float32


def _landmarks_with(index: int, value: float) -> np.ndarray:
    points = ADAFACE_TEMPLATE_112.astype(np.float64).copy()
    points[index, 1] = value
    return points


@pytest.mark.parametrize(
    ("landmarks", "message"),
    [
        ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], r"^landmarks: need 10 values, got 6$"),
        (np.zeros((5, 3)), r"^landmarks: need 10 values, got 15$"),
        (np.zeros((2, 5)), r"^landmarks: need shape \(5, 2\) or \(10,\), got \(2, 5\)"),
        (["a"] * 10, r"^landmarks: need 10 numbers, got \['a'"),
        (_landmarks_with(2, np.nan), r"^landmarks: point 2 is not finite \("),
        (_landmarks_with(4, np.inf), r"^landmarks: point 4 is not finite \("),
        (np.full((5, 2), 33.0), r"^landmarks: degenerate, all 5 points coincide"),
        (np.full(10, 1e39), r"^landmarks: values overflow float32$"),
    ],
)
def test_bad_landmarks_raise(landmarks: object, message: str) -> None:
    image = np.zeros((120, 120, 3), dtype=np.uint8)
    with pytest.raises(AlignmentError, match=message):
        align_face(image, landmarks)
    with pytest.raises(ValueError, match=message):
        adaface_similarity(landmarks)


def test_mtcnn_layout_needs_ten_values() -> None:
    with pytest.raises(AlignmentError, match=r"^landmarks: need 10 values, got 8$"):
        mtcnn_landmarks(np.arange(8.0))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((50, 50, 3), dtype=np.float32), r"^image: need uint8 \(H, W, 3\), got float32"),
        (
            np.zeros((50, 50), dtype=np.uint8),
            r"^image: need uint8 \(H, W, 3\), got uint8 \(50, 50\)",
        ),
        (np.zeros((0, 50, 3), dtype=np.uint8), r"^image: empty, shape \(0, 50, 3\)$"),
    ],
)
def test_bad_image_raises(image: np.ndarray, message: str) -> None:
    with pytest.raises(AlignmentError, match=message):
        align_face(image, ADAFACE_TEMPLATE_112)


# --- InsightFace norm_crop (Umeyama onto arcface_dst) ---


def test_arcface_template_is_insightfaces() -> None:
    np.testing.assert_array_equal(ARCFACE_TEMPLATE_112, np.array(DESIGN_TEMPLATE))


def test_umeyama_on_the_template_is_identity() -> None:
    matrix = umeyama_similarity(ARCFACE_TEMPLATE_112)
    # Landmarks are float32 on the way in, so identity up to float32 rounding of the points.
    np.testing.assert_allclose(matrix, np.eye(2, 3), atol=1e-5)


@pytest.mark.parametrize(
    ("degrees", "scale", "shift"),
    [(0.0, 1.0, (0.0, 0.0)), (17.0, 2.5, (140.0, -30.0)), (-95.0, 0.4, (3.0, 410.0))],
)
def test_umeyama_maps_similar_points_back(
    degrees: float, scale: float, shift: tuple[float, float]
) -> None:
    points = _apply(_similarity(degrees, scale, shift), ARCFACE_TEMPLATE_112)
    matrix = umeyama_similarity(points)
    np.testing.assert_allclose(_apply(matrix, points), ARCFACE_TEMPLATE_112, atol=1e-4)


@pytest.mark.parametrize(("degrees", "scale"), [(0.0, 1.0), (-12.0, 3.0), (40.0, 0.7)])
def test_umeyama_equals_adaface_fit_for_exactly_similar_points(
    degrees: float, scale: float
) -> None:
    # The two templates agree to 5e-7 px, so on exactly similar points both least-squares
    # fits are the same transform.
    points = _apply(_similarity(degrees, scale, (200.0, 90.0)), ADAFACE_TEMPLATE_112)
    np.testing.assert_allclose(umeyama_similarity(points), adaface_similarity(points), atol=1e-4)


def test_umeyama_equals_skimage_similarity_transform() -> None:
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(3)
    for _ in range(20):
        truth = _similarity(
            rng.uniform(-60, 60), rng.uniform(0.3, 4), tuple(rng.uniform(-50, 300, 2))
        )
        points = _apply(truth, ARCFACE_TEMPLATE_112) + rng.normal(0, 3, (5, 2))
        points = points.astype(np.float32).astype(np.float64)
        tform = transform.SimilarityTransform.from_estimate(points, ARCFACE_TEMPLATE_112)
        assert tform
        np.testing.assert_allclose(umeyama_similarity(points), tform.params[:2], atol=1e-9)


def test_umeyama_never_reflects() -> None:
    mirrored = ARCFACE_TEMPLATE_112.copy()
    mirrored[:, 0] = 112.0 - mirrored[:, 0]
    matrix = umeyama_similarity(mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0
    # AdaFace's fit does reflect the same points (upstream behaviour).
    assert np.linalg.det(adaface_similarity(mirrored)[:, :2]) < 0


def test_norm_crop_uses_the_shared_warp() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    points = _apply(_similarity(10.0, 2.0, (60.0, 40.0)), ARCFACE_TEMPLATE_112)
    crop = norm_crop(image, points)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, warp_affine(image, umeyama_similarity(points)))
    np.testing.assert_array_equal(align_with(image, points, AlignMethod.INSIGHTFACE), crop)
    np.testing.assert_array_equal(
        align_with(image, points, AlignMethod.ADAFACE), align_face(image, points)
    )
    with pytest.raises(AlignmentError, match="degenerate"):
        norm_crop(image, np.full((5, 2), 7.0))
    with pytest.raises(AlignmentError, match="image"):
        norm_crop(image[..., 0], points)
