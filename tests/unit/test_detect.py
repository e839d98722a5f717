"""MTCNN detector: faces on skimage photos, no-face images, selection, downscaling, weights."""

from __future__ import annotations

import base64
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from adaface_server.backends import precision
from adaface_server.errors import StartupError
from adaface_server.preprocess.align import align_face, mtcnn_landmarks
from adaface_server.preprocess.detect import MTCNN, DetectParams, Selection, nms
from adaface_server.preprocess.mtcnn_nets import load_nets
from adaface_server.preprocess.mtcnn_weights import WeightsError, weight_paths
from adaface_server.preprocess.pipeline import select_faces

WEIGHTS = Path(__file__).resolve().parents[2] / ".cache" / "mtcnn"


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    torch.set_num_threads(2)
    return MTCNN(WEIGHTS)


def assert_plausible(face) -> None:
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
    x1, y1, x2, y2 = face.box
    assert lex < rex and lmx < rmx  # left/right as seen in the image
    assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above nose above mouth
    assert lex < nx < rex
    assert ((face.landmarks >= [x1, y1]) & (face.landmarks <= [x2, y2])).all()
    assert face.score > 0.9


def test_astronaut_has_exactly_one_face(detector: MTCNN) -> None:
    faces = detector.detect(skimage.data.astronaut())
    assert len(faces) == 1
    assert_plausible(faces[0])
    x1, y1, x2, y2 = faces[0].box
    assert 150 < x1 < 200 and 40 < y1 < 80 and 250 < x2 < 290 and 150 < y2 < 200


def test_upstream_softmax_option_still_finds_the_face(detector: MTCNN) -> None:
    faces = detector.detect(skimage.data.astronaut(), DetectParams(upstream_softmax=True))
    assert len(faces) == 1
    assert_plausible(faces[0])
    ours = detector.detect(skimage.data.astronaut())[0]
    # Different P-Net candidates, same face: landmarks agree to a few pixels.
    assert np.abs(faces[0].landmarks - ours.landmarks).max() < 3.0


@pytest.mark.parametrize(
    "image",
    [
        skimage.data.chelsea(),
        np.zeros((300, 400, 3), np.uint8),
        np.full((10, 10, 3), 128, np.uint8),
        np.zeros((1, 1, 3), np.uint8),
    ],
    ids=["cat", "blank", "10x10", "1x1"],
)
def test_images_without_faces(detector: MTCNN, image: np.ndarray) -> None:
    assert detector.detect(image) == []


def two_faces() -> np.ndarray:
    a = skimage.data.astronaut()
    # Right copy half-size, padded: two faces of different sizes and scores.
    small = np.asarray(Image.fromarray(a).resize((256, 256), Image.BILINEAR))
    right = np.zeros_like(a)
    right[128:384, 128:384] = small
    return np.ascontiguousarray(np.concatenate([a, right], axis=1))


def test_two_faces_and_selection(detector: MTCNN) -> None:
    faces = detector.detect(two_faces())
    assert len(faces) == 2
    for face in faces:
        assert_plausible(face)
    assert faces[0].score >= faces[1].score
    largest = select_faces(faces, Selection.LARGEST)
    assert len(largest) == 1 and largest[0].box[0] < 512  # the full-size (left) face
    assert select_faces(faces, Selection.BEST) == [faces[0]]
    assert select_faces(faces, Selection.ALL) == faces
    # min_face_size drops the small face (~55 px wide) but keeps the big one.
    big_only = detector.detect(two_faces(), DetectParams(min_face_size=80))
    assert len(big_only) == 1 and big_only[0].box[0] < 512


def test_huge_image_is_downscaled_and_landmarks_map_back(detector: MTCNN) -> None:
    a = skimage.data.astronaut()
    huge = np.asarray(Image.fromarray(a).resize((3000, 3000), Image.BILINEAR))
    small = MTCNN(WEIGHTS, max_side=512)
    calls = []
    original = small._stage1

    def spy(image, *args):
        calls.append(image.shape)
        return original(image, *args)

    small._stage1 = spy  # type: ignore[method-assign]
    faces = small.detect(huge)
    assert calls == [(512, 512, 3)]
    assert len(faces) == 1
    ref = detector.detect(a)[0]
    # Same face in full-resolution coordinates (3000/512 scale): within a few source pixels.
    assert np.abs(faces[0].landmarks / (3000 / 512) - ref.landmarks).max() < 3.0


def test_nms_union_and_min() -> None:
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [2, 2, 5, 5]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    # 'min' overlap: the small box inside the big one suppresses it.
    assert nms(boxes, scores, 0.7, mode="min").tolist() == [3, 2]


def upstream_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str) -> list:
    """AdaFace's nms loop: keep the best, drop what overlaps it by more than threshold."""
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order, keep = np.argsort(scores, kind="stable")[::-1], []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1.0)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1.0)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


@pytest.mark.parametrize("n", [2, 63, 64, 65, 200, 700])
def test_blocked_nms_keeps_what_upstreams_loop_keeps(n: int) -> None:
    """Across block edges, with tied scores and clustered boxes (many suppressions)."""
    rng = np.random.default_rng(n)
    for _ in range(5):
        corner = rng.uniform(0, 250, (n, 2)).round(1)
        boxes = np.concatenate([corner, corner + rng.integers(8, 60, (n, 1))], axis=1)
        scores = rng.integers(0, 12, n) / 12.0
        for mode, threshold in (("union", 0.5), ("union", 0.7), ("min", 0.7)):
            expected = upstream_nms(boxes, scores, threshold, mode)
            assert nms(boxes, scores, threshold, mode).tolist() == expected


def test_missing_and_corrupt_weights_say_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"missing.*mtcnn_weights --dest"):
        weight_paths(tmp_path)
    for name in ("pnet", "rnet", "onet"):
        shutil.copy(WEIGHTS / f"{name}.pt", tmp_path / f"{name}.pt")
    weight_paths(tmp_path)
    (tmp_path / "rnet.pt").write_bytes(b"garbage")
    with pytest.raises(StartupError, match=r"rnet\.pt is corrupt"):
        load_nets(tmp_path)


REFERENCE = Path(__file__).resolve().parents[1] / "data" / "mtcnn_upstream_astronaut.json"


def test_upstream_softmax_matches_adaface_pipeline(detector: MTCNN) -> None:
    """Parity with upstream's own MTCNN + align_multi (tests/tools/make_mtcnn_reference.py)."""
    ref = json.loads(REFERENCE.read_text())
    astronaut = skimage.data.astronaut()
    faces = detector.detect(astronaut, DetectParams(upstream_softmax=True))
    assert len(faces) == len(ref["boxes"]) == 1
    face = faces[0]
    ref_marks = mtcnn_landmarks(ref["landmarks"][0])  # upstream order x1..x5, y1..y5
    assert np.abs(face.landmarks - ref_marks).max() < 1.0
    assert np.abs(face.box - np.asarray(ref["boxes"][0])).max() < 1.5
    assert face.score == pytest.approx(ref["scores"][0], abs=1e-4)
    crop = np.frombuffer(base64.b64decode(ref["crops_b64"][0]), np.uint8)
    crop = crop.reshape(ref["crop_shape"])
    ours = align_face(astronaut, face.landmarks).astype(np.int16)
    assert np.abs(ours - crop).max() <= 3


PHOTOS = {
    "astronaut": skimage.data.astronaut,
    "two_faces": two_faces,
    "cat": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
}


def test_detect_many_matches_one_photo_at_a_time(detector: MTCNN) -> None:
    """R-Net and O-Net batched across photos give each photo the faces it gets alone."""
    images = [make() for make in PHOTOS.values()]
    params = [DetectParams(), DetectParams(min_face_size=80), DetectParams(), DetectParams()]
    together = detector.detect_many(images, params)
    assert [len(f) for f in together] == [1, 1, 0, 0]
    for image, p, faces in zip(images, params, together, strict=True):
        alone = detector.detect(image, p)
        assert len(alone) == len(faces)
        for a, b in zip(alone, faces, strict=True):
            # Batch composition changes the order of float sums only.
            assert np.abs(a.landmarks - b.landmarks).max() < 1e-3
            assert np.abs(a.box - b.box).max() < 1e-3
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_fast_pyramid_stays_within_one_level_of_pils(detector: MTCNN) -> None:
    """The torch pyramid (default) against the PIL one (upstream_softmax): pixels at most
    one grey level apart, fewer than 1% of them differing."""
    image = two_faces()
    sizes = [(math.ceil(1024 * s), math.ceil(512 * s)) for s in (0.6, 0.43, 0.2, 0.05)]
    pil = list(detector._pyramid(image, sizes, exact=True))
    fast = list(detector._pyramid(image, sizes, exact=False))
    for a, b in zip(pil, fast, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
        assert (a.int() - b.int()).abs().max().item() <= 1
        assert (a != b).float().mean().item() < 0.01


@pytest.mark.skipif(not precision.cpu_supports_bf16(), reason="no bf16 kernels on this CPU")
def test_bf16_detector_finds_the_same_faces() -> None:
    bf16 = MTCNN(WEIGHTS, precision="bf16")
    for make in PHOTOS.values():
        image = make()
        ref, faces = MTCNN(WEIGHTS).detect(image), bf16.detect(image)
        assert len(faces) == len(ref)
        for a, b in zip(ref, faces, strict=True):
            assert np.abs(a.landmarks - b.landmarks).max() < 3.0
            assert a.score == pytest.approx(b.score, abs=0.02)


@pytest.mark.skipif(not precision.cpu_supports_bf16(), reason="no bf16 kernels on this CPU")
def test_upstream_option_stays_exact_fp32_on_a_bf16_detector(detector: MTCNN) -> None:
    image = skimage.data.astronaut()
    params = DetectParams(upstream_softmax=True)
    (ref,) = detector.detect(image, params)
    (face,) = MTCNN(WEIGHTS, precision="bf16").detect(image, params)
    np.testing.assert_array_equal(face.landmarks, ref.landmarks)
    assert face.score == ref.score


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_detector_finds_the_same_faces(detector: MTCNN, dtype: str) -> None:
    precision.exact_fp32_on_cuda(torch.device("cuda"))  # as the server does: fp32, not TF32
    cuda = MTCNN(WEIGHTS, device="cuda", precision=dtype)
    for make in PHOTOS.values():
        image = make()
        ref, faces = detector.detect(image), cuda.detect(image)
        assert len(faces) == len(ref)
        for a, b in zip(ref, faces, strict=True):
            assert np.abs(a.landmarks - b.landmarks).max() < (0.5 if dtype == "fp32" else 3.0)
    # The parity option runs fp32 and PIL's pyramid wherever the detector lives.
    (face,) = cuda.detect(skimage.data.astronaut(), DetectParams(upstream_softmax=True))
    (ref,) = detector.detect(skimage.data.astronaut(), DetectParams(upstream_softmax=True))
    assert np.abs(face.landmarks - ref.landmarks).max() < 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pyramid_shrinks_a_large_photo_past_the_kernels_limit() -> None:
    """At --detect-max-side 2048 the smallest levels are shrunk ~150x, past what CUDA's
    antialiased kernel takes (~94x): those are resized on the CPU; the same face is found."""
    big = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((2048, 2048)))
    (ref,) = MTCNN(WEIGHTS, max_side=2048).detect(big)
    (face,) = MTCNN(WEIGHTS, max_side=2048, device="cuda").detect(big)
    assert np.abs(face.landmarks - ref.landmarks).max() < 2.0


def assert_same_faces(reference: MTCNN, other: MTCNN, landmark_px: float, score: float) -> None:
    """Both detectors find the same faces in PHOTOS (one detect_many call each), landmarks
    within landmark_px and scores within score."""
    images = [make() for make in PHOTOS.values()]
    params = [DetectParams()] * len(images)
    for ref, faces in zip(
        reference.detect_many(images, params), other.detect_many(images, params), strict=True
    ):
        assert len(faces) == len(ref)
        for a, b in zip(ref, faces, strict=True):
            assert np.abs(a.landmarks - b.landmarks).max() < landmark_px
            assert a.score == pytest.approx(b.score, abs=score)


def test_openvino_detector_finds_the_same_faces(detector: MTCNN) -> None:
    """The nets compiled by OpenVINO (fp32) against torch's: same faces, same landmarks."""
    ov = MTCNN(WEIGHTS, runtime="openvino", threads=2)
    assert_same_faces(detector, ov, landmark_px=1e-2, score=1e-4)
    # The parity option runs torch's nets in fp32 and PIL's pyramid on any runtime.
    upstream = DetectParams(upstream_softmax=True)
    (face,) = ov.detect(skimage.data.astronaut(), upstream)
    (ref,) = detector.detect(skimage.data.astronaut(), upstream)
    np.testing.assert_array_equal(face.landmarks, ref.landmarks)


@pytest.mark.skipif(not precision.cpu_supports_bf16(), reason="no bf16 kernels on this CPU")
def test_openvino_bf16_detector_stays_within_a_pixel(detector: MTCNN) -> None:
    """OpenVINO's bf16 nets (keeping its own f32 layers) move landmarks well under a pixel
    (0.6 px at most on bench_server's photos), where torch's bf16 allows 3."""
    ov = MTCNN(WEIGHTS, runtime="openvino", precision="bf16", threads=2)
    assert_same_faces(detector, ov, landmark_px=1.0, score=1e-3)


def test_openvino_detector_runs_torch_single_threaded_on_its_own_thread() -> None:
    """Only the detector's torch thread drops to one intra-op thread: the caller's threads,
    and threads that start using torch later, keep the setting they had."""
    torch.set_num_threads(2)
    ov = MTCNN(WEIGHTS, runtime="openvino", threads=2)
    assert ov._torch_thread is not None
    assert ov._torch_thread.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2
    with ThreadPoolExecutor(1) as later:
        assert later.submit(torch.get_num_threads).result() == 2
    assert MTCNN(WEIGHTS)._torch_thread is None  # torch's nets keep every thread


def test_openvino_runs_on_the_cpu_only() -> None:
    with pytest.raises(ValueError, match="runs MTCNN on the CPU"):
        MTCNN(WEIGHTS, device="meta", runtime="openvino")
