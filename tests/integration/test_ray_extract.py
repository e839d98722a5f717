"""Bulk extraction on a local Ray (2 CPUs) against a real server, checked against Extractor."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from adaface_client import Extractor
from adaface_client.ray_data import EmbedBatches, extract_to_parquet

ATOL = 1e-5
N = 240
BAD = 117  # this row's file is not an image


def crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("ray_images")
    paths = []
    for i in range(N):
        path = root / f"img_{i:04d}.jpg"
        if i == BAD:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(crop(i)).save(path, quality=95)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def reference(embed_server, images) -> np.ndarray:
    with Extractor(embed_server.address, progress=False) as ex:
        return ex.extract(images, on_error="nan", alignment="aligned")


def read_rows(out) -> list[dict]:
    return ray.data.read_parquet(str(out)).take_all()


def test_manifest_to_parquet_matches_the_extractor(
    embed_server, local_ray, images, reference, tmp_path
):
    manifest = tmp_path / "train.csv"
    order = np.random.default_rng(0).permutation(N)  # not the files' sorted order
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "path"])
        writer.writerows([f"face-{i:04d}", images[i]] for i in order)
    out = tmp_path / "features"
    extract_to_parquet(
        manifest, out, [embed_server.address], concurrency=2, batch_size=32, alignment="aligned"
    )
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"face-{i:04d}" for i in order], "order and ids kept"
    got = np.stack([np.asarray(r["embedding"], np.float32) for r in rows])
    want = reference[order]
    bad = int(np.flatnonzero(order == BAD)[0])
    errors = [r["error"] for r in rows]
    assert errors[bad].startswith("UNDECODABLE: ") and errors.count("") == N - 1
    assert np.isnan(got[bad]).all() and np.isnan(rows[bad]["norm"])
    ok = np.arange(N) != bad
    np.testing.assert_allclose(got[ok], want[ok], atol=ATOL, rtol=0)


def test_folder_to_parquet(embed_server, local_ray, images, reference, tmp_path):
    folder = tmp_path / "some"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.jpg").write_bytes(Path(images[i]).read_bytes())
    out = tmp_path / "folder_features"
    extract_to_parquet(
        folder, out, embed_server.address, concurrency=1, batch_size=8, alignment="aligned"
    )
    rows = read_rows(out)
    assert [r["path"] for r in rows] == [f"{i:02d}.jpg" for i in range(20)]
    assert "bytes" not in rows[0]
    got = np.stack([np.asarray(r["embedding"], np.float32) for r in rows])
    np.testing.assert_allclose(got, reference[:20], atol=ATOL, rtol=0)


def test_a_down_server_is_skipped_for_the_next(embed_server, images, reference):
    """Without Ray: the callable fails over from a dead address to a live one."""
    embed = EmbedBatches(
        ["127.0.0.1:1", embed_server.address], retries=3, backoff=0.01, alignment="aligned"
    )
    embed._turn = 0  # start on the dead one
    out = embed({"path": np.asarray(images[:5], dtype=object), "label": np.arange(5)})
    np.testing.assert_allclose(out["embedding"], reference[:5], atol=ATOL, rtol=0)
    assert out["label"].tolist() == [0, 1, 2, 3, 4] and list(out["error"]) == [""] * 5
