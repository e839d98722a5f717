"""Writes tests/data/mtcnn_upstream_astronaut.json: upstream AdaFace's own MTCNN on astronaut.

Usage (in a scratch venv, never the project's; see tests/data/README.md):
    python tests/tools/make_mtcnn_reference.py UPSTREAM_GIT_DIR [OUT]

UPSTREAM_GIT_DIR is a (bare) git repository of mk-minchul/AdaFace. Its ``face_alignment/``
folder (code and the .npy P/R/O-Net weights) is extracted from HEAD with ``git archive`` into
a temp dir and imported from there; nothing of it is written into this project. Needs torch
(CPU is enough), numpy, pillow, opencv-python-headless and scikit-image.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import skimage
import torch
from PIL import Image
from skimage import data

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "data" / "mtcnn_upstream_astronaut.json"


def extract_upstream(git_dir: Path) -> tuple[Path, str]:
    """``git archive HEAD face_alignment`` into a temp dir; returns (root, commit)."""
    commit = subprocess.run(
        ["git", "-C", str(git_dir), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    tar = subprocess.run(
        ["git", "-C", str(git_dir), "archive", "HEAD", "face_alignment"],
        check=True,
        capture_output=True,
    ).stdout
    root = Path(tempfile.mkdtemp(prefix="adaface_upstream_mtcnn_"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")
    weights = root / "face_alignment" / "mtcnn_pytorch" / "src" / "weights"
    for name in ("pnet", "rnet", "onet"):
        if not (weights / f"{name}.npy").is_file():
            raise SystemExit(f"{weights / name}.npy is missing from the mirror (LFS?)")
    return root, commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", type=Path, help="mk-minchul/AdaFace git dir (bare is fine)")
    parser.add_argument("out", type=Path, nargs="?", default=DEFAULT_OUT)
    args = parser.parse_args()

    root, commit = extract_upstream(args.upstream)
    sys.path.insert(0, str(root))
    from face_alignment import mtcnn  # only importable after extraction

    torch.set_num_threads(1)
    detector = mtcnn.MTCNN(device="cpu", crop_size=(112, 112))
    image = Image.fromarray(data.astronaut()).convert("RGB")
    boxes, landmarks = detector.detect_faces(
        image,
        detector.min_face_size,
        detector.thresholds,
        detector.nms_thresholds,
        detector.factor,
    )
    _, faces = detector.align_multi(image)
    crops = [np.asarray(face, dtype=np.uint8) for face in faces]
    weights = root / "face_alignment" / "mtcnn_pytorch" / "src" / "weights"
    record = {
        "image": "skimage.data.astronaut()",
        "upstream_commit": commit,
        "constants": {
            "min_face_size": detector.min_face_size,
            "thresholds": list(detector.thresholds),
            "nms_thresholds": list(detector.nms_thresholds),
            "factor": detector.factor,
        },
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "pillow": Image.__version__,
            "scikit-image": skimage.__version__,
        },
        "weights_sha256": {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(weights.glob("*.npy"))
        },
        # boxes: x1, y1, x2, y2 (inclusive corners); landmarks: x1..x5, y1..y5 (upstream order).
        "boxes": np.asarray(boxes, dtype=np.float64)[:, :4].tolist(),
        "scores": np.asarray(boxes, dtype=np.float64)[:, 4].tolist(),
        "landmarks": np.asarray(landmarks, dtype=np.float64).tolist(),
        # align_multi's 112x112 RGB uint8 crops (warp_and_crop_face + cv2.warpAffine).
        # base64 of the raw bytes, shape crop_shape (JSON lists would be ~4x larger).
        "crop_shape": [112, 112, 3],
        "crops_b64": [base64.b64encode(crop.tobytes()).decode("ascii") for crop in crops],
        "crops_sha256": [hashlib.sha256(crop.tobytes()).hexdigest() for crop in crops],
    }
    args.out.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}: {len(record['boxes'])} face(s)")
    for box, score, marks in zip(
        record["boxes"], record["scores"], record["landmarks"], strict=True
    ):
        print(" box", np.round(box, 3), "score", round(score, 6))
        print(" landmarks", np.round(marks, 3))


if __name__ == "__main__":
    main()
