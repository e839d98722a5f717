"""Five-point face alignment onto a 112x112 template.

Two fits share one cv2-exact warp: AdaFace's (``align_face``, bit-compatible with upstream's
``warp_and_crop_face`` + cv2) and InsightFace's ``norm_crop`` (Umeyama similarity onto the
``arcface_dst`` template).
"""

from __future__ import annotations

import logging
from enum import Enum

import numpy as np
from numpy.typing import ArrayLike

log = logging.getLogger(__name__)

__all__ = [
    "ADAFACE_TEMPLATE_112",
    "ARCFACE_TEMPLATE_112",
    "CROP_SIZE",
    "AlignMethod",
    "AlignmentError",
    "adaface_similarity",
    "align_face",
    "align_with",
    "mtcnn_landmarks",
    "norm_crop",
    "parse_landmarks",
    "umeyama_similarity",
    "warp_affine",
    "warp_affine_numpy",
]

CROP_SIZE = (112, 112)

# Upstream keeps the 96x112 points in float64, shifts them by +8 px in x for the square crop
# (get_reference_facial_points(default_square=True)) and only then casts to float32 inside
# warp_and_crop_face; doing the same keeps every float32 bit identical to upstream's.
_TEMPLATE_96X112 = np.array(
    [
        [30.29459953, 51.69630051],
        [65.53179932, 51.50139999],
        [48.02519989, 71.73660278],
        [33.54930115, 92.3655014],
        [62.72990036, 92.20410156],
    ],
    dtype=np.float64,
)
ADAFACE_TEMPLATE_112: np.ndarray = (_TEMPLATE_96X112 + np.array([8.0, 0.0])).astype(np.float32)
"""(5, 2) float32: left eye, right eye, nose tip, left / right mouth corner, as (x, y) px."""
ADAFACE_TEMPLATE_112.flags.writeable = False

# InsightFace's arcface_dst (insightface.utils.face_align) for 112x112 crops, same point order.
ARCFACE_TEMPLATE_112: np.ndarray = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
"""(5, 2) float64: InsightFace's template, (x, y) px, in the order of ADAFACE_TEMPLATE_112."""
ARCFACE_TEMPLATE_112.flags.writeable = False


class AlignMethod(Enum):
    """How five landmarks become a crop: the fit; both use the same cv2-exact warp."""

    ADAFACE = "adaface"  # matlab_cp2tform similarity onto AdaFace's template (upstream)
    INSIGHTFACE = "insightface"  # Umeyama similarity onto arcface_dst (norm_crop)


# Below this RMS spread (px) the five points carry no scale or rotation, and upstream's
# fit would crash in numpy.linalg.inv with "Singular matrix" instead of a useful message.
_MIN_SPREAD_PX = 1e-3


class AlignmentError(ValueError):
    """The image or landmarks cannot be aligned; the message names the offending field."""


def parse_landmarks(landmarks: ArrayLike) -> np.ndarray:
    """Validate landmarks and return them as a (5, 2) float32 array of (x, y) pixels.

    Accepted layouts: shape (5, 2), or 10 flat values interleaved as
    ``x1, y1, x2, y2, ..., x5, y5`` (the order of the API's repeated field). Points are, in
    order: left eye, right eye, nose tip, left mouth corner, right mouth corner, in the pixel
    coordinates of the image (x right, y down, (0, 0) = centre of the top-left pixel).
    MTCNN emits ``x1..x5, y1..y5`` instead: convert those with :func:`mtcnn_landmarks`.
    """
    try:
        arr = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AlignmentError(f"landmarks: need 10 numbers, got {_describe(landmarks)}") from exc
    if arr.size != 10:
        raise AlignmentError(f"landmarks: need 10 values, got {arr.size}")
    if arr.shape not in ((5, 2), (10,)):
        raise AlignmentError(
            f"landmarks: need shape (5, 2) or (10,), got {tuple(arr.shape)} "
            "(a (2, 5) array is ambiguous: pass it transposed)"
        )
    points = arr.reshape(5, 2)
    bad = ~np.isfinite(points)
    if bad.any():
        index = int(np.argwhere(bad)[0][0])
        raise AlignmentError(
            f"landmarks: point {index} is not finite ({points[index, 0]!r}, {points[index, 1]!r})"
        )
    # Upstream casts with np.float32(facial_pts); casting once here keeps the fit identical.
    with np.errstate(over="ignore"):
        points32 = points.astype(np.float32)
    if not np.isfinite(points32).all():
        raise AlignmentError("landmarks: values overflow float32")
    spread = float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))
    if spread < _MIN_SPREAD_PX:
        raise AlignmentError(
            f"landmarks: degenerate, all 5 points coincide (RMS spread {spread:.3g} px, "
            f"need at least {_MIN_SPREAD_PX:g} px)"
        )
    return points32


def mtcnn_landmarks(values: ArrayLike) -> np.ndarray:
    """Convert MTCNN's 10-value layout ``x1..x5, y1..y5`` to validated (5, 2) float32 points.

    This is how upstream AdaFace feeds its detector output to the warp
    (``[[landmark[j], landmark[j + 5]] for j in range(5)]``).
    """
    try:
        flat = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise AlignmentError(f"landmarks: need 10 numbers, got {_describe(values)}") from exc
    if flat.size != 10:
        raise AlignmentError(f"landmarks: need 10 values, got {flat.size}")
    return parse_landmarks(np.stack([flat[:5], flat[5:]], axis=1))


def _nonreflective_fit(uv: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Similarity uv -> xy as a 3x3 row-vector matrix, solved the way matlab_cp2tform does.

    The least-squares problem is posed template -> landmarks (X from xy, U from uv) and the
    result inverted, exactly like upstream; posing it the other way gives a different
    least-squares optimum and different pixels. Upstream's rank(X) check is skipped: X is
    built from the (mirrored) template only, so it always has full rank.
    """
    m = xy.shape[0]
    x = xy[:, 0].reshape(-1, 1)
    y = xy[:, 1].reshape(-1, 1)
    # float32 columns stacked with float64 ones/zeros -> float64, as upstream's hstack.
    a = np.vstack(
        (
            np.hstack((x, y, np.ones((m, 1)), np.zeros((m, 1)))),
            np.hstack((y, -x, np.zeros((m, 1)), np.ones((m, 1)))),
        )
    )
    b = np.vstack((uv[:, 0].reshape(-1, 1), uv[:, 1].reshape(-1, 1)))
    r = np.squeeze(np.linalg.lstsq(a, b, rcond=None)[0])
    sc, ss, tx, ty = r[0], r[1], r[2], r[3]
    t_inv = np.array([[sc, -ss, 0], [ss, sc, 0], [tx, ty, 1]])
    try:
        t = np.linalg.inv(t_inv)
    except np.linalg.LinAlgError as exc:
        raise AlignmentError("landmarks: degenerate, similarity fit is singular") from exc
    t[:, 2] = np.array([0, 0, 1])
    return t


def _apply(t: np.ndarray, uv: np.ndarray) -> np.ndarray:
    return np.dot(np.hstack((uv, np.ones((uv.shape[0], 1)))), t)[:, :-1]


def adaface_similarity(landmarks: ArrayLike) -> np.ndarray:
    """Return the 2x3 float64 matrix mapping image points onto :data:`ADAFACE_TEMPLATE_112`.

    Reproduces upstream's ``get_similarity_transform_for_cv2(src, ref)`` (reflective=True)
    operation for operation, so the matrix is bit-identical under the same numpy/LAPACK.
    The fit may be a reflection: a mirrored landmark set (eyes swapped) is mapped with a
    mirroring transform, as upstream does.
    """
    uv = parse_landmarks(landmarks)
    xy = np.array(ADAFACE_TEMPLATE_112, dtype=np.float32)

    trans1 = _nonreflective_fit(uv, xy)

    # Upstream quirk, reproduced on purpose: findSimilarity does `xyR = xy` (an alias, not a
    # copy) before negating x, so the template itself is mirrored and BOTH residuals below are
    # measured against the mirrored template, not the real one. Both candidate fits still
    # target the real template, so the comparison is not the intended one. In practice it
    # picks the same branch as the intended test for ordinary and for mirrored faces: the
    # losing fit is the inverse of a collapsed template->landmarks fit and lands hundreds of
    # px away, which dwarfs the ~2*|x| offset of the right fit from the mirrored template.
    # Where both fits are poor (sets far from a face shape: ~0.3% of a random sweep of
    # heavily perturbed templates) the choice differs from the intended one; matching
    # upstream's pixels is what matters here (reference case "quirk_branch" pins it).
    xy[:, 0] = -1 * xy[:, 0]
    trans2r = _nonreflective_fit(uv, xy)
    trans2 = np.dot(trans2r, np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 1]]))

    norm1 = np.linalg.norm(_apply(trans1, uv) - xy)
    norm2 = np.linalg.norm(_apply(trans2, uv) - xy)
    trans = trans1 if norm1 <= norm2 else trans2
    matrix = trans[:, 0:2].T
    if not np.isfinite(matrix).all():
        raise AlignmentError("landmarks: degenerate, similarity fit is not finite")
    return np.ascontiguousarray(matrix)


# OpenCV's fixed-point warp constants (imgproc: INTER_BITS, AB_BITS, INTER_REMAP_COEF_BITS).
_INTER_BITS = 5
_INTER_TAB_SIZE = 1 << _INTER_BITS
_AB_BITS = 10
_AB_SCALE = 1 << _AB_BITS
_ROUND_DELTA = _AB_SCALE // _INTER_TAB_SIZE // 2
_COEF_BITS = 15
_INT16_MIN, _INT16_MAX = -(1 << 15), (1 << 15) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def _bilinear_table() -> np.ndarray:
    """(1024, 4) int32 weights (w00, w01, w10, w11) indexed by fy * 32 + fx."""
    f = np.arange(_INTER_TAB_SIZE, dtype=np.int64)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    wy = (_INTER_TAB_SIZE - fy, fy)
    wx = (_INTER_TAB_SIZE - fx, fx)
    scale = (1 << _COEF_BITS) // (_INTER_TAB_SIZE * _INTER_TAB_SIZE)
    tab = np.stack([wy[0] * wx[0], wy[0] * wx[1], wy[1] * wx[0], wy[1] * wx[1]], axis=-1)
    # OpenCV stores the weights as int16, so the whole-pixel weight 32768 saturates to 32767
    # (its sum fix-up writes past the entry and is overwritten); (v*32767 + 2**14) >> 15 == v
    # for every uint8 v, so it is harmless, but keeping it makes the arithmetic the same.
    tab = np.minimum(tab * scale, _INT16_MAX)
    return tab.reshape(-1, 4).astype(np.int32)


_BILINEAR_TAB = _bilinear_table()
_BILINEAR_TAB.flags.writeable = False


def _cv_round(values: np.ndarray) -> np.ndarray:
    """cvRound(double) on x86: round half to even; NaN / out of int32 give INT_MIN."""
    r = np.rint(values)
    with np.errstate(invalid="ignore"):
        bad = ~((r >= _INT32_MIN) & (r <= _INT32_MAX))
    return np.where(bad, _INT32_MIN, r).astype(np.int32)


def _invert_affine(m: np.ndarray) -> tuple[float, ...]:
    """Invert a 2x3 affine matrix with OpenCV's scalar formula (singular -> all zeros)."""
    m0, m1, m2, m3, m4, m5 = (float(v) for v in m.reshape(6))
    d = m0 * m4 - m1 * m3
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m4 * d, m0 * d
    m0, m1, m3, m4 = a11, m1 * -d, m3 * -d, a22
    b1 = -m0 * m2 - m1 * m5
    b2 = -m3 * m2 - m4 * m5
    return m0, m1, b1, m3, m4, b2


def warp_affine(
    image: np.ndarray, matrix: ArrayLike, size: tuple[int, int] = CROP_SIZE
) -> np.ndarray:
    """``cv2.warpAffine(image, matrix, size)`` (INTER_LINEAR, constant 0 border), what upstream
    AdaFace calls: OpenCV's own when it is installed and proved identical to
    :func:`warp_affine_numpy` on a probe set at first use (about 35x faster: 35 us vs 1.2 ms
    a 112x112 crop), the numpy port otherwise. Same arguments and output as the port."""
    cv2 = _opencv()
    img = np.asarray(image)
    if (
        cv2 is None
        or img.dtype != np.uint8
        or img.ndim not in (2, 3)
        or max(img.shape[:2], default=0) >= _CV2_MAX_SIDE
        or min(img.shape[:2], default=0) < 1
    ):
        return warp_affine_numpy(image, matrix, size)
    m = np.asarray(matrix, dtype=np.float64)
    width, height = (int(v) for v in size)
    if m.shape != (2, 3) or width < 1 or height < 1:
        return warp_affine_numpy(image, matrix, size)  # raises the port's ValueError
    out = cv2.warpAffine(np.ascontiguousarray(img), m, (width, height))
    return out.reshape((height, width, *img.shape[2:]))


#: OpenCV keeps warp coordinates in int16 (SHRT_MAX); larger images go to the numpy port,
#: which reproduces that clipping only for what it computes itself.
_CV2_MAX_SIDE = 32767
_cv2_state: list[object] = []  # [module or None] once decided


def _opencv():
    """cv2 when importable and bit-identical to the numpy port on the probe set; else None.

    OpenCV 5 changed warpAffine's arithmetic (crops differ by up to 5 levels from 4.x and from
    upstream's references), so a version that disagrees is never used, whatever is installed.
    """
    if _cv2_state:
        return _cv2_state[0]
    try:
        import cv2
    except ImportError:
        _cv2_state.append(None)
        return None
    cv2.setNumThreads(1)  # 112x112 warps gain nothing from threads; ours run in a pool
    rng = np.random.default_rng(20240229)
    image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    for i in range(64):
        # Faces of any size and place, some partly outside, every fourth mirrored (a
        # reflective fit), landmarks off the template by a few pixels.
        points = ADAFACE_TEMPLATE_112 * rng.uniform(0.3, 1.2) + rng.uniform(-10.0, 60.0, 2)
        points = points + rng.normal(0.0, 2.0, points.shape)
        if i % 4 == 0:
            points[:, 0] = 80.0 - points[:, 0]
        m = adaface_similarity(points)
        got = cv2.warpAffine(image, m, CROP_SIZE)
        if not np.array_equal(got, warp_affine_numpy(image, m, CROP_SIZE)):
            log.warning(
                "OpenCV %s warpAffine differs from upstream's arithmetic (OpenCV 4.x): "
                "aligning with the numpy port instead (about 35x slower per crop)",
                cv2.__version__,
            )
            _cv2_state.append(None)
            return None
    _cv2_state.append(cv2)
    return cv2


def warp_affine_numpy(
    image: np.ndarray, matrix: ArrayLike, size: tuple[int, int] = CROP_SIZE
) -> np.ndarray:
    """Warp like ``cv2.warpAffine(image, matrix, size)`` (INTER_LINEAR, constant 0 border).

    ``matrix`` maps source (x, y) to destination (x, y); ``size`` is (width, height) as in
    OpenCV. ``image`` is uint8 (H, W) or (H, W, C); the output is uint8 (height, width[, C])
    and, unlike cv2, keeps a trailing channel axis of size 1.
    The arithmetic follows OpenCV's fixed-point path: inverse map in double, source
    coordinates rounded to 1/32 px, 15-bit integer bilinear weights, round-half-up.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(
            f"image: need uint8 (H, W) or (H, W, C), got {img.dtype} {tuple(img.shape)}"
        )
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"matrix: need shape (2, 3), got {tuple(m.shape)}")
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size: need positive (width, height), got {size}")

    a0, a1, a2, a3, a4, a5 = _invert_affine(m)
    xs = np.arange(width, dtype=np.float64)
    ys = np.arange(height, dtype=np.float64)
    # Per-column and per-row terms are rounded separately and then summed, as in
    # WarpAffineInvoker; rounding the full expression once differs by 1/1024 px at times.
    adelta = _cv_round(a0 * xs * _AB_SCALE)
    bdelta = _cv_round(a3 * xs * _AB_SCALE)
    x0 = _cv_round((a1 * ys + a2) * _AB_SCALE) + np.int32(_ROUND_DELTA)
    y0 = _cv_round((a4 * ys + a5) * _AB_SCALE) + np.int32(_ROUND_DELTA)
    with np.errstate(over="ignore"):
        # int32 arithmetic wraps like the C code does for absurdly far-off coordinates.
        qx = (x0[:, None] + adelta[None, :]) >> (_AB_BITS - _INTER_BITS)
        qy = (y0[:, None] + bdelta[None, :]) >> (_AB_BITS - _INTER_BITS)
    sx = np.clip(qx >> _INTER_BITS, _INT16_MIN, _INT16_MAX)
    sy = np.clip(qy >> _INTER_BITS, _INT16_MIN, _INT16_MAX)
    weights = _BILINEAR_TAB[
        (qy & (_INTER_TAB_SIZE - 1)) * _INTER_TAB_SIZE + (qx & (_INTER_TAB_SIZE - 1))
    ]

    src_h, src_w = img.shape[:2]
    flat = img.reshape(src_h * src_w, -1)
    acc = np.zeros((height, width, flat.shape[1]), dtype=np.int32)
    # A neighbour outside the image contributes the border value 0, which is what OpenCV's
    # BORDER_CONSTANT path computes for both partially and fully outside pixels.
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        px = sx + dx
        py = sy + dy
        inside = (px >= 0) & (px < src_w) & (py >= 0) & (py < src_h)
        index = np.where(inside, py * src_w + px, 0)
        w = np.where(inside, weights[..., k], 0)
        acc += flat[index] * w[..., None]
    out = ((acc + (1 << (_COEF_BITS - 1))) >> _COEF_BITS).astype(np.uint8)
    return out.reshape((height, width, *img.shape[2:]))


def align_face(image: np.ndarray, landmarks: ArrayLike) -> np.ndarray:
    """Crop a 112x112x3 uint8 face from an RGB (H, W, 3) uint8 image given 5 landmarks.

    Same pixels as upstream ``warp_and_crop_face(np.array(img), pts, reference,
    crop_size=(112, 112))``; see :func:`parse_landmarks` for the accepted layouts. Parts of
    the crop that fall outside the image are black.
    """
    img = _check_rgb(image)
    return warp_affine(img, adaface_similarity(landmarks), CROP_SIZE)


def umeyama_similarity(landmarks: ArrayLike) -> np.ndarray:
    """Return the 2x3 float64 matrix mapping image points onto :data:`ARCFACE_TEMPLATE_112`.

    Least-squares similarity (rotation, uniform scale, translation) by Umeyama's method
    (IEEE TPAMI 13(4), 1991), as ``skimage.transform.SimilarityTransform.estimate`` computes
    it for InsightFace's ``estimate_norm``. The rotation is always proper: a mirrored
    landmark set is fitted with the best rotation, never with a reflection.
    """
    src = parse_landmarks(landmarks).astype(np.float64)
    dst = ARCFACE_TEMPLATE_112
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    n = src.shape[0]
    cov = dst_c.T @ src_c / n
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    src_var = src_c.var(axis=0).sum()
    scale = float(sigma @ d) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    matrix = np.hstack([scale * rotation, translation[:, None]])
    if not np.isfinite(matrix).all() or scale <= 0:
        raise AlignmentError("landmarks: degenerate, Umeyama similarity fit failed")
    return np.ascontiguousarray(matrix)


def norm_crop(image: np.ndarray, landmarks: ArrayLike) -> np.ndarray:
    """InsightFace-style 112x112x3 uint8 crop: :func:`umeyama_similarity` + the cv2 warp.

    Same input rules as :func:`align_face`; only the fit and the template differ.
    """
    img = _check_rgb(image)
    return warp_affine(img, umeyama_similarity(landmarks), CROP_SIZE)


def align_with(image: np.ndarray, landmarks: ArrayLike, method: AlignMethod) -> np.ndarray:
    """Dispatch to :func:`align_face` or :func:`norm_crop`."""
    if method is AlignMethod.INSIGHTFACE:
        return norm_crop(image, landmarks)
    return align_face(image, landmarks)


def _check_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise AlignmentError(f"image: need uint8 (H, W, 3), got {img.dtype} {tuple(img.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise AlignmentError(f"image: empty, shape {tuple(img.shape)}")
    return img


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
