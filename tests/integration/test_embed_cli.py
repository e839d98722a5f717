"""`python client/embed.py` as a subprocess against a real embedding server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_client import Client

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-6
LANDMARKS = [
    38.2946,
    51.6963,
    73.5318,
    51.5014,
    56.0252,
    71.7366,
    41.5493,
    92.3655,
    70.7299,
    92.2041,
]
LANDMARKS_SHIFTED = [v + 20 for v in LANDMARKS]


def crop(seed: int, size: int = 112) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def save(path: Path, arr: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def run_cli(*args: object, aligned: bool = True) -> subprocess.CompletedProcess:
    """These folders hold pre-aligned crops: --aligned unless `aligned=False` (detection)."""
    flags = ["--aligned"] if aligned else []
    return subprocess.run(
        [sys.executable, "client/embed.py", *map(str, args), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    save(root / "alice" / "1.jpg", crop(1), "JPEG")
    save(root / "alice" / "2.png", crop(2), "PNG")
    save(root / "bob" / "deep" / "3.webp", crop(3), "WEBP")
    save(root / "bob" / "4.bmp", crop(4), "BMP")
    save(root / "carol" / "5.JPG", crop(5), "JPEG")  # upper-case suffix counts
    save(root / "6.jpeg", crop(6), "JPEG")
    (root / "bob" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "carol" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")  # ignored
    return root


GOOD = ["6.jpeg", "alice/1.jpg", "alice/2.png", "bob/4.bmp", "bob/deep/3.webp", "carol/5.JPG"]
BAD = ["bob/corrupt.jpg", "carol/empty.png"]


def test_partial_failure_npz(embed_server, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "features.npz"
    proc = run_cli(photos, "--server", embed_server.address, "--out", out, "--batch-size", 3)
    assert proc.returncode == 1, proc.stderr

    with np.load(out) as data:
        features, norms, labels = data["features"], data["norms"], data["labels"]
    assert labels.tolist() == GOOD
    assert features.shape == (len(GOOD), 512) and features.dtype == np.float32
    assert norms.shape == (len(GOOD), 1) and norms.dtype == np.float32
    with Client(embed_server.address) as client:
        ref, ref_norms = client.embed([photos / label for label in GOOD], alignment="aligned")
    np.testing.assert_allclose(features, ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-6, atol=ATOL)

    failed = (tmp_path / "out" / "features.npz.failed.txt").read_text().splitlines()
    assert [line.split(": ")[0] for line in failed] == BAD
    assert all(": UNDECODABLE: " in line and "images[" not in line for line in failed)
    for line in failed:
        assert line in proc.stderr
    assert f"embedded {len(GOOD)} of {len(GOOD) + len(BAD)} images" in proc.stderr
    assert "2 failed" in proc.stderr
    # Non-image files are left out, counted and named.
    assert "skipped 1 non-image file (not bmp, jpeg, jpg, png, webp): notes.txt" in proc.stderr
    # stderr is not a TTY here: no progress bar unless forced
    assert "img/s" not in proc.stderr


def test_pt_output_with_landmarks_and_progress(embed_server, photos: Path, tmp_path: Path) -> None:
    for bad in BAD:
        (photos / bad).unlink()
    # A large photo with landmarks: aligned on the server.
    big = crop(7, size=160)
    save(photos / "big" / "face.png", big, "PNG")
    marks = tmp_path / "marks.json"
    marks.write_text(json.dumps({"big/face.png": LANDMARKS_SHIFTED}))
    out = tmp_path / "gallery.pt"
    proc = run_cli(
        photos, "--server", embed_server.address, "--out", out, "--landmarks", marks,
        "--flip", "--concurrency", 2, "--progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "gallery.pt.failed.txt").exists()
    assert "img/s" in proc.stderr and "ETA" in proc.stderr

    data = torch.load(out)
    labels = sorted([*GOOD, "big/face.png"])
    assert data["labels"] == labels
    assert data["features"].shape == (len(labels), 512)
    assert data["features"].dtype == torch.float32 and data["norms"].shape == (len(labels), 1)
    with Client(embed_server.address, flip=True) as client:
        images = [photos / label for label in labels]
        lms = [LANDMARKS_SHIFTED if label == "big/face.png" else None for label in labels]
        modes = ["landmarks" if lm else "aligned" for lm in lms]
        ref, _ = client.embed(images, landmarks=lms, alignment=modes)
    np.testing.assert_allclose(data["features"].numpy(), ref, rtol=0, atol=ATOL)


def test_landmarks_csv_and_all_good_exit_zero(embed_server, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    save(root / "a.png", crop(10, size=150), "PNG")
    save(root / "b.jpg", crop(11), "JPEG")
    marks = tmp_path / "marks.csv"
    marks.write_text("path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\na.png," + ",".join(map(str, LANDMARKS)))
    out = tmp_path / "f.npz"
    proc = run_cli(root, "--server", embed_server.address, "--out", out, "--landmarks", marks)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as data:
        assert data["labels"].tolist() == ["a.png", "b.jpg"]
    # Without landmarks the 150x150 photo is not an aligned crop.
    proc = run_cli(root, "--server", embed_server.address, "--out", out, "--no-progress")
    assert proc.returncode == 1
    assert "a.png: NOT_ALIGNED" in proc.stderr


def test_usage_errors_exit_two(embed_server, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    proc = run_cli(empty, "--server", embed_server.address, "--out", tmp_path / "o.npz")
    assert proc.returncode == 2 and "no images" in proc.stderr

    proc = run_cli(tmp_path / "missing", "--out", tmp_path / "o.npz")
    assert proc.returncode == 2 and "not a directory" in proc.stderr

    save(empty / "a.png", crop(0), "PNG")
    proc = run_cli(empty, "--out", tmp_path / "o.csv")
    assert proc.returncode == 2 and ".npz or .pt" in proc.stderr

    proc = run_cli(empty, "--bogus-flag")
    assert proc.returncode == 2

    bad_marks = tmp_path / "marks.json"
    bad_marks.write_text('{"a.png": [1, 2, 3]}')
    proc = run_cli(empty, "--landmarks", bad_marks, "--out", tmp_path / "o.npz")
    assert proc.returncode == 2 and "10" in proc.stderr


def test_unreachable_server_exits_two(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    save(tmp_path / "p" / "a.png", crop(0), "PNG")
    proc = run_cli(tmp_path / "p", "--server", f"127.0.0.1:{port}", "--out", tmp_path / "o.npz")
    assert proc.returncode == 2
    assert "cannot reach server" in proc.stderr
    assert not (tmp_path / "o.npz").exists()
