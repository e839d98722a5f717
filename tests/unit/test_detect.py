"""MTCNN detector: faces on skimage photos, no-face images, selection, downscaling, weights."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

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
