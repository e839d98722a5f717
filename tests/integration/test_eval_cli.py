"""adaface-eval as a subprocess against a real server: a synthetic .bin end to end, calibration."""

from __future__ import annotations

import io
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tests.unit.test_verification import insightface_style_kfold

REPO = Path(__file__).resolve().parents[2]
N_SOURCES = 10  # 20 pairs: 10 same (an image and a perturbed copy), 10 different


def _sources() -> list[np.ndarray]:
    """Ten 112x112 regions of the astronaut photo and ten smooth noise images."""
    photo = skdata.astronaut()
    out = []
    for k in range(N_SOURCES // 2):
        y, x = 20 + 35 * (k % 5), 30 + 150 * (k // 5)
        region = Image.fromarray(photo[y : y + 224, x : x + 224]).resize((112, 112))
        out.append(np.asarray(region))
    rng = np.random.default_rng(7)
    for _ in range(N_SOURCES // 2):
        coarse = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(coarse).resize((112, 112), Image.BILINEAR)))
    return out


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pairs() -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(3)
    sources = _sources()
    images: list[bytes] = []
    issame = []
    for i, src in enumerate(sources):
        # same: a slightly brighter, noisy copy; different: the next source in the list
        noisy = np.clip(src.astype(int) + 6 + rng.integers(-5, 6, src.shape), 0, 255)
        images += [_jpeg(src), _jpeg(noisy.astype(np.uint8))]
        issame.append(True)
        images += [_jpeg(src), _jpeg(sources[(i + 7) % len(sources)])]
        issame.append(False)
    return images, np.array(issame)


@pytest.fixture(scope="module")
def synthetic_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, issame = _pairs()
    path = tmp_path_factory.mktemp("bins") / "synthetic.bin"
    path.write_bytes(pickle.dumps((images, issame), protocol=4))
    return path


def reference_scores(model_path: Path, images: list[bytes], flip: bool) -> np.ndarray:
    """Pair cosines computed without the server: PIL decode, the model contract (RGB->BGR,
    (x/255-0.5)/0.5), one image at a time, flip fusion l2(e*n + e_f*n_f) by hand."""
    module = torch.jit.load(str(model_path)).eval()

    def forward(rgb: np.ndarray) -> tuple[np.ndarray, float]:
        x = ((rgb[:, :, ::-1] / 255.0) - 0.5) / 0.5
        t = torch.tensor(x.transpose(2, 0, 1).copy()).float()[None]
        with torch.inference_mode():
            emb, norm = module(t)
        return emb[0].double().numpy(), float(norm[0, 0])

    rows = []
    for blob in images:
        rgb = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        e, n = forward(rgb)
        if flip:
            ef, nf = forward(rgb[:, ::-1])
            e = e * n + ef * nf
        rows.append(e / np.linalg.norm(e))
    emb = np.stack(rows)
    return np.sum(emb[0::2] * emb[1::2], axis=1), emb


def third_highest_impostor(scores: np.ndarray, issame: np.ndarray) -> float:
    """The threshold for FAR 0.2 over 10 different pairs: 2 false accepts allowed."""
    assert np.count_nonzero(~issame) == 10
    return float(np.sort(scores[~issame])[-3])


def run_eval(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adaface_client.eval_cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bin_end_to_end_json_matches_independent_reference(
    embed_server, synthetic_bin: Path, tmp_path: Path
) -> None:
    roc = tmp_path / "roc.png"
    proc = run_eval(
        synthetic_bin, "--server", embed_server.address, "--json", "--roc", roc, "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["flip_fusion"] for r in lines] == [False, True]
    images, issame = pickle.loads(synthetic_bin.read_bytes())
    for row in lines:
        assert set(row) >= {
            "dataset",
            "pairs",
            "accuracy_mean",
            "accuracy_std",
            "best_threshold",
            "tar_at_far",
            "flip_fusion",
        }
        assert row["dataset"] == "synthetic"
        assert row["pairs"] == 2 * N_SOURCES
        # 10 different pairs cannot measure a FAR of 1e-3 or 1e-4
        assert row["tar_at_far"] == {"1e-03": None, "1e-04": None}
        _scores, emb = reference_scores(embed_server.spec.model_path, images, row["flip_fusion"])
        ref_acc, ref_dist_thr = insightface_style_kfold(emb, issame)
        assert row["accuracy_mean"] == pytest.approx(ref_acc.mean(), abs=1e-12)
        assert row["accuracy_std"] == pytest.approx(ref_acc.std(), abs=1e-12)
        assert row["best_threshold"] == pytest.approx(np.mean(1 - ref_dist_thr / 2), abs=1e-9)
        # Random weights still map a near-copy closer than another picture.
        assert row["accuracy_mean"] > 0.8
    png = Image.open(roc)
    assert png.format == "PNG" and png.size[0] > 100


def test_several_bins_table_and_tar(embed_server, synthetic_bin: Path, tmp_path: Path) -> None:
    second = tmp_path / "cfp_fp.bin"
    second.write_bytes(synthetic_bin.read_bytes())
    proc = run_eval(
        synthetic_bin,
        second,
        "--server",
        embed_server.address,
        "--flip",
        "off",
        "--far",
        "0.2",
        "--progress",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].split()[:4] == ["dataset", "flip", "pairs", "accuracy"]
    assert "TAR@FAR=2e-01 %" in out[0]
    rows = [line.split() for line in out[1:3]]
    assert [r[0] for r in rows] == ["synthetic", "cfp_fp"]
    images, issame = pickle.loads(synthetic_bin.read_bytes())
    scores, _ = reference_scores(embed_server.spec.model_path, images, flip=False)
    t = third_highest_impostor(scores, issame)
    tar = 100 * np.mean(scores[issame] > t)
    for r in rows:
        assert r[1] == "off" and r[2] == "20"
        assert float(r[-1]) == pytest.approx(tar, abs=0.006)
    # --progress draws a bar although stderr is a pipe (tqdm's or the built-in one: both
    # show done/total)
    assert "40/40" in proc.stderr


def test_calibrate_pairs_csv_writes_threshold(embed_server, tmp_path: Path) -> None:
    images, issame = _pairs()
    folder = tmp_path / "crops"
    folder.mkdir()
    rows = ["image_a,image_b,same"]
    for i in range(len(issame)):
        for j in (0, 1):
            (folder / f"{i}_{j}.jpg").write_bytes(images[2 * i + j])
        rows.append(f"crops/{i}_0.jpg,crops/{i}_1.jpg,{int(issame[i])}")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    env_file = tmp_path / "verify.env"
    proc = run_eval(
        "calibrate",
        "--pairs",
        pairs,
        "--aligned",
        "--server",
        embed_server.address,
        "--far",
        "0.2",
        "--far",
        "0.001",
        "--write-threshold",
        env_file,
        "--json",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    scores, _ = reference_scores(embed_server.spec.model_path, images, flip=False)
    t = third_highest_impostor(scores, issame)
    expected = math.floor(t * 1e6 + 1) / 1e6
    at = {row["far"]: row for row in report["at_far"]}
    assert at["2e-01"]["threshold"] == pytest.approx(expected, abs=2e-6)
    assert at["2e-01"]["measured_far"] <= 0.2
    assert at["1e-03"]["threshold"] is None
    assert report["pairs"] == 20 and report["different_pairs"] == 10
    lines = env_file.read_text().splitlines()
    assert lines[0].startswith("#")
    assert lines[1] == f"ADAFACE_VERIFY_THRESHOLD={at['2e-01']['threshold']:.6f}"


def test_malicious_bin_is_refused_before_any_call(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class RunsCommand:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            import os

            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "lfw.bin"
    evil.write_bytes(pickle.dumps(([b"x", b"y"], RunsCommand())))
    proc = run_eval(evil, "--server", "127.0.0.1:1", "--no-progress")
    assert proc.returncode == 2
    assert f"{evil}: not a validation .bin: global posix.system refused" in proc.stderr
    assert not marker.exists()


def test_usage_errors_name_the_problem(tmp_path: Path) -> None:
    proc = run_eval(tmp_path / "missing.bin", "--server", "127.0.0.1:1")
    assert proc.returncode == 2 and "missing.bin: cannot read" in proc.stderr
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("image_a,image_b,same\na.jpg,b.jpg,1\n")
    proc = run_eval("calibrate", "--pairs", csv_file, "--server", "127.0.0.1:1")
    assert proc.returncode == 2 and "pairs.csv:2: no such image 'a.jpg'" in proc.stderr
    csv_file.write_text("image_a,image_b,same\na.jpg,b.jpg,1\nc.jpg,d.jpg,maybe\n")
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    proc = run_eval("calibrate", "--pairs", csv_file, "--server", "127.0.0.1:1")
    assert proc.returncode == 2 and "pairs.csv:3: same must be 1/0" in proc.stderr


def test_failed_images_are_named(embed_server, tmp_path: Path) -> None:
    images, issame = _pairs()
    images[5] = b"\xff\xd8 not a jpeg"
    bad = tmp_path / "broken.bin"
    bad.write_bytes(pickle.dumps((images, issame)))
    proc = run_eval(bad, "--server", embed_server.address, "--flip", "off", "--no-progress")
    assert proc.returncode == 2
    assert "broken: 1 of 40 images failed (image 5: UNDECODABLE" in proc.stderr


def test_calibrate_from_bin_with_roc(embed_server, synthetic_bin: Path, tmp_path: Path) -> None:
    roc = tmp_path / "calibration.png"
    proc = run_eval(
        "calibrate",
        "--bin",
        synthetic_bin,
        "--far",
        "0.2",
        "--server",
        embed_server.address,
        "--roc",
        roc,
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    images, issame = pickle.loads(synthetic_bin.read_bytes())
    scores, _ = reference_scores(embed_server.spec.model_path, images, flip=False)
    expected = math.floor(third_highest_impostor(scores, issame) * 1e6 + 1) / 1e6
    line = next(x for x in proc.stdout.splitlines() if "FAR 2e-01" in x)
    assert float(line.split("--verify-threshold")[1].split()[0]) == pytest.approx(
        expected, abs=2e-6
    )
    assert Image.open(roc).format == "PNG"
