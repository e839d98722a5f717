"""Resumable extraction cannot return another run's rows: every output file has a manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaface_client import Client, Extractor, ManifestMismatch
from adaface_client.extract import gather

ATOL = 1e-5
A = "aligned"  # the test images are random 112x112 crops, not photos


def crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def write(root: Path, seeds: range) -> list[str]:
    root.mkdir(exist_ok=True)
    paths = []
    for i in seeds:
        path = root / f"{i:03d}.png"
        Image.fromarray(crop(i)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, embed_server):
    """Two lists of 8 different images, and each one's reference embeddings."""
    root = tmp_path_factory.mktemp("manifest")
    a, b = write(root / "a", range(8)), write(root / "b", range(100, 108))
    with Client(embed_server.address) as client:
        return a, b, client.embed(a, alignment=A)[0], client.embed(b, alignment=A)[0]


def extractor(server, **kw) -> Extractor:
    return Extractor(server.address, progress=False, **kw)


def test_other_images_of_the_same_count_are_refused(embed_server, two_sets, tmp_path):
    a, b, ref_a, ref_b = two_sets
    out = tmp_path / "f.npy"
    with extractor(embed_server) as ex:
        np.testing.assert_allclose(ex.extract(a, out, alignment=A), ref_a, atol=ATOL)
        manifest = json.loads(Path(f"{out}.manifest.json").read_text())
        assert manifest["rows"] == 8 and manifest["model"] == embed_server.spec.name
        with pytest.raises(ManifestMismatch, match="inputs_sha256") as info:
            ex.extract(b, out, alignment=A)
        assert "first differing input: row 0" in str(info.value)
        assert "overwrite=True" in str(info.value)
        np.testing.assert_allclose(np.load(out), ref_a, atol=ATOL)  # nothing was touched
        # Only the order changed: still another file.
        with pytest.raises(ManifestMismatch, match="first differing input: row 3"):
            ex.extract([*a[:3], a[4], a[3], *a[5:]], out, alignment=A)
        fresh = ex.extract(b, out, overwrite=True, alignment=A)
    np.testing.assert_allclose(fresh, ref_b, atol=ATOL)
    np.testing.assert_allclose(np.load(out), ref_b, atol=ATOL)


def test_a_changed_file_or_options_are_refused(embed_server, tmp_path):
    root = tmp_path / "own"
    mine = write(root, range(8))
    out = tmp_path / "f.npy"
    with extractor(embed_server) as ex:
        ex.extract(mine, out, alignment=A)
        with pytest.raises(ManifestMismatch, match="alignment"):
            ex.extract(mine, out, alignment="detect")
    with extractor(embed_server, flip=True) as ex, pytest.raises(ManifestMismatch, match="flip"):
        ex.extract(mine, out, alignment=A)
    # Same path, new content (size or mtime changes): the old row is not reused.
    Image.fromarray(crop(999)).save(mine[2])
    os.utime(mine[2], ns=(1, 1))
    with extractor(embed_server) as ex:
        with pytest.raises(ManifestMismatch, match="first differing input: row 2"):
            ex.extract(mine, out, alignment=A)
        with Client(embed_server.address) as client:
            want = client.embed(mine, alignment=A)[0]
        np.testing.assert_allclose(
            ex.extract(mine, out, overwrite=True, alignment=A), want, atol=ATOL
        )


def test_in_memory_inputs_are_fingerprinted_by_content(embed_server, tmp_path):
    out = tmp_path / "f.npy"
    images = [crop(i) for i in range(4)]
    with extractor(embed_server) as ex:
        ex.extract(images, out, alignment=A)
        ex.extract([im.copy() for im in images], out, alignment=A)  # equal content: reused
        changed = [im.copy() for im in images]
        changed[1][0, 0, 0] ^= 1
        with pytest.raises(ManifestMismatch, match="first differing input: row 1"):
            ex.extract(changed, out, alignment=A)
        encoded = [Path(p).read_bytes() for p in write(tmp_path / "b", range(4))]
        with pytest.raises(ManifestMismatch, match="inputs_sha256"):
            ex.extract(encoded, out, alignment=A)


def test_a_file_without_manifest_is_refused(embed_server, two_sets, tmp_path):
    a, _, ref_a, _ = two_sets
    out = tmp_path / "old.npy"
    np.save(out, np.zeros((8, 512), np.float32))  # e.g. written by an older version
    with extractor(embed_server) as ex:
        with pytest.raises(ManifestMismatch, match="exists without a manifest"):
            ex.extract(a, out, alignment=A)
        np.testing.assert_allclose(
            ex.extract(a, out, overwrite=True, alignment=A), ref_a, atol=ATOL
        )


def test_every_rank_checks_the_manifest(embed_server, two_sets, tmp_path):
    a, b, ref_a, _ = two_sets
    out = tmp_path / "shared.npy"
    with extractor(embed_server) as ex:
        ex.extract(a, out, rank=0, world_size=2, alignment=A)
        with pytest.raises(ManifestMismatch, match="inputs_sha256"):
            ex.extract(b, out, rank=1, world_size=2, alignment=A)
        ex.extract(a, out, rank=1, world_size=2, alignment=A)
    np.testing.assert_allclose(gather(out, world_size=2, timeout=5), ref_a, atol=ATOL)
    # A done marker left by another extraction is not taken for this one's.
    marker = Path(f"{out}.shard-1-of-2.done")
    stale = json.loads(marker.read_text()) | {"manifest": "0" * 64}
    marker.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=r"done markers of ranks \[1\] were written for another"):
        gather(out, world_size=2, timeout=5)
