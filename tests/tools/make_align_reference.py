"""Writes tests/data/align_reference.npz: crops made by upstream AdaFace's own code + real cv2.

Usage (in a scratch venv, never the project's; see tests/data/ALIGN_REFERENCE.md):
    python tests/tools/make_align_reference.py UPSTREAM_GIT_DIR [OUT]

UPSTREAM_GIT_DIR is a (bare) git repository of mk-minchul/AdaFace; align_trans.py and
matlab_cp2tform.py are taken from its HEAD into a temp dir and imported from there. Needs
numpy, opencv-python-headless and scikit-image (for skimage.data.astronaut()).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import skimage
from skimage import data

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "align_reference.npz"
UPSTREAM_DIR = "face_alignment/mtcnn_pytorch/src"

# Hand-placed on skimage.data.astronaut() (512x512): eyes, nose tip, mouth corners.
ASTRONAUT = np.array(
    [[203.0, 100.5], [247.5, 102.5], [225.5, 125.0], [206.5, 144.0], [241.0, 143.5]]
)
# A noisy set on which upstream's aliased reflection test (see align.py) picks the other
# branch than a correct test would: the crop must follow upstream's choice.
QUIRK = np.array(
    [
        [104.63631, 98.75575],
        [115.07785, 90.11193],
        [107.820404, 114.69298],
        [105.13129, 147.38431],
        [87.748726, 134.10219],
    ]
)


def import_upstream(git_dir: Path) -> tuple[object, object, str]:
    """Extract upstream's alignment modules from git HEAD into a temp package and import them."""
    commit = subprocess.run(
        ["git", "-C", str(git_dir), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    root = Path(tempfile.mkdtemp(prefix="adaface_upstream_align_"))
    pkg = root / "mtcnn_pytorch" / "src"
    pkg.mkdir(parents=True)
    # Empty package markers: upstream's own __init__ files would pull in torch and the nets.
    (root / "mtcnn_pytorch" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    for name in ("align_trans", "matlab_cp2tform"):
        text = subprocess.run(
            ["git", "-C", str(git_dir), "show", f"HEAD:{UPSTREAM_DIR}/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        (pkg / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # upstream's `align_type is 'affine'`
        align_trans = importlib.import_module("mtcnn_pytorch.src.align_trans")
        cp2tform = importlib.import_module("mtcnn_pytorch.src.matlab_cp2tform")
    return align_trans, cp2tform, commit


def rotate_about_centroid(points: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * scale
    centre = points.mean(axis=0)
    return (points - centre) @ rot.T + centre


def build_cases(rng: np.random.Generator) -> list[tuple[str, np.ndarray | None, np.ndarray]]:
    """(name, stored image or None for the astronaut, landmarks (5, 2) float64)."""
    noise = rng.integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
    tiny = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    quirk_image = rng.integers(0, 256, size=(200, 180, 3), dtype=np.uint8)
    mirrored = ASTRONAUT[[1, 0, 2, 4, 3]]
    return [
        ("astronaut_frontal", None, ASTRONAUT),
        ("astronaut_rotated", None, rotate_about_centroid(ASTRONAUT, 25.0, 1.3)),
        ("astronaut_mirrored", None, mirrored),
        # Face box reaches past the top-left corner: black border in the crop.
        ("astronaut_partly_outside", None, ASTRONAUT - np.array([190.25, 95.75])),
        # Eyes ~300 px apart: strong minification.
        ("astronaut_big_face", None, rotate_about_centroid(ASTRONAUT, -10.0, 6.5) + 30.0),
        # Eyes ~9 px apart on noise: strong magnification, every weight pattern exercised.
        ("noise_upscale", noise, rotate_about_centroid(ASTRONAUT, 40.0, 0.2) - [195.0, 90.0]),
        (
            "tiny_image",
            tiny,
            np.array([[1.2, 1.4], [3.6, 1.3], [2.5, 2.6], [1.5, 4.1], [3.4, 4.2]]),
        ),
        ("quirk_branch", quirk_image, QUIRK),
    ]


def intended_choice_is_plain(cp2tform: object, src: np.ndarray, ref: np.ndarray) -> bool:
    """The reflection test as matlab's cp2tform means it (against the unmirrored template)."""
    trans1, _ = cp2tform.findNonreflectiveSimilarity(src, ref.copy())
    mirrored = ref.copy()
    mirrored[:, 0] = -mirrored[:, 0]
    trans2r, _ = cp2tform.findNonreflectiveSimilarity(src, mirrored)
    trans2 = trans2r @ np.diag([-1.0, 1.0, 1.0])
    norm1 = np.linalg.norm(cp2tform.tformfwd(trans1, src) - ref)
    norm2 = np.linalg.norm(cp2tform.tformfwd(trans2, src) - ref)
    return bool(norm1 <= norm2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT)
    args = parser.parse_args()
    align_trans, cp2tform, commit = import_upstream(args.upstream)

    # As MTCNN(crop_size=(112, 112)) builds self.refrence.
    reference = align_trans.get_reference_facial_points(default_square=True)
    astronaut = data.astronaut()
    arrays: dict[str, np.ndarray] = {
        "meta__upstream_commit": np.array(commit),
        "meta__cv2_version": np.array(cv2.__version__),
        "meta__numpy_version": np.array(np.__version__),
        "meta__skimage_version": np.array(skimage.__version__),
        "meta__astronaut_sha256": np.array(hashlib.sha256(astronaut.tobytes()).hexdigest()),
        "meta__template": np.float32(reference),
    }
    names = []
    for name, image, landmarks in build_cases(np.random.default_rng(20240611)):
        src_img = astronaut if image is None else image
        facial5points = [[float(x), float(y)] for x, y in landmarks]
        crop = align_trans.warp_and_crop_face(
            np.array(src_img), facial5points, reference, crop_size=(112, 112)
        )
        matrix = cp2tform.get_similarity_transform_for_cv2(
            np.float32(facial5points), np.float32(reference)
        )
        # The crop above used the same matrix: check, so the stored pair is consistent.
        assert np.array_equal(crop, cv2.warpAffine(np.array(src_img), matrix, (112, 112)))
        plain = cp2tform.findNonreflectiveSimilarity(
            np.float32(facial5points), np.float32(reference)
        )[0][:, 0:2].T
        uses_plain = bool(np.array_equal(matrix, plain))
        intended = intended_choice_is_plain(
            cp2tform, np.float32(facial5points), np.float32(reference)
        )
        names.append(name)
        arrays[f"{name}__landmarks"] = np.asarray(landmarks, dtype=np.float64)
        arrays[f"{name}__matrix"] = matrix
        arrays[f"{name}__crop"] = crop
        arrays[f"{name}__reflective"] = np.array(not uses_plain)
        arrays[f"{name}__intended_reflective"] = np.array(not intended)
        if image is not None:
            arrays[f"{name}__image"] = image
        print(
            f"{name:26s} reflective={not uses_plain!s:5s} intended_reflective={not intended!s:5s}"
            f" black_px={int((crop == 0).all(axis=2).sum())}"
        )
    arrays["meta__cases"] = np.array(names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size} bytes), upstream {commit}, cv2 {cv2.__version__}")


if __name__ == "__main__":
    main()
