"""Extractor against a real server: in memory, resumable memmap, sharded across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaface_client import Client, ExtractionError, Extractor, GatherTimeout
from adaface_client.extract import gather, shard_env

ATOL = 1e-5  # rows batched differently may round differently in the last bits


def crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(30):
        path = root / f"{i:03d}.png"
        Image.fromarray(crop(i)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def reference(embed_server, photos) -> tuple[np.ndarray, np.ndarray]:
    with Client(embed_server.address) as client:
        return client.embed(photos, alignment="aligned")


def test_in_memory_mixed_inputs(embed_server, photos, reference):
    images = [
        p if i % 3 == 0 else Path(p).read_bytes() if i % 3 == 1 else crop(i)
        for i, p in enumerate(photos)
    ]
    with Extractor(embed_server.address, chunk_size=7, progress=False) as extractor:
        features, norms = extractor.extract(images, with_norms=True, alignment="aligned")
    assert features.shape == (30, 512) and features.dtype == np.float32
    np.testing.assert_allclose(features, reference[0], atol=ATOL)
    np.testing.assert_allclose(norms, reference[1], rtol=1e-5)


class Stop(Exception):
    pass


def test_memmap_resumes_after_an_interruption(embed_server, photos, reference, tmp_path):
    out = tmp_path / "features.npy"
    committed = []

    def stop_after_two_chunks(n):
        committed.append(n)
        if len(committed) == 2:
            raise Stop

    with Extractor(
        embed_server.address, chunk_size=5, prefetch=1, progress=stop_after_two_chunks
    ) as extractor:
        with pytest.raises(Stop):
            extractor.extract(photos, out, alignment="aligned")
        rows = np.load(tmp_path / "features.npy.rows.npy")
        assert rows.sum() == 10 and rows[:10].all()
        partial = np.load(out)
        assert np.isnan(partial[10:]).all()

        resumed = []
        extractor.progress = resumed.append
        features = extractor.extract(photos, out, alignment="aligned")
    assert sum(resumed) == 20, "a rerun only embeds the rows not yet written"
    assert isinstance(features, np.memmap)
    np.testing.assert_allclose(np.load(out), reference[0], atol=ATOL)
    np.testing.assert_allclose(np.load(f"{out}.norms.npy"), reference[1], rtol=1e-5)

    # Everything done: nothing is sent again.
    again = []
    with Extractor(embed_server.address, progress=again.append) as extractor:
        extractor.extract(photos, out, alignment="aligned")
    assert again == []


def test_failed_images(embed_server, photos, tmp_path):
    images = [*photos[:4], b"not an image", photos[5]]
    out = tmp_path / "f.npy"
    with Extractor(embed_server.address, progress=False) as extractor:
        with pytest.raises(ExtractionError) as info:
            extractor.extract(images, out, alignment="aligned")
        assert [(row, reason) for row, reason, _ in info.value.errors] == [(4, "UNDECODABLE")]
        assert np.load(f"{out}.rows.npy").tolist() == [1, 1, 1, 1, 0, 1]
        features = extractor.extract(images, on_error="nan", alignment="aligned")
    assert np.isnan(features[4]).all() and not np.isnan(np.delete(features, 4, 0)).any()


def test_shard_env():
    assert shard_env(env={}) == (0, 1)
    assert shard_env(env={"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == (2, 4)
    assert shard_env(env={"LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert shard_env(1, 3, env={"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank 3"):
        shard_env(env={"RANK": "3", "WORLD_SIZE": "3"})


WORKER = textwrap.dedent(
    """
    import json, os, sys
    from adaface_client import Extractor

    address, out, listing = sys.argv[1:4]
    paths = json.load(open(listing))
    crash_after = int(os.environ.get("CRASH_AFTER_CHUNKS", "0"))
    chunks = []

    def progress(n):
        chunks.append(n)
        if crash_after and len(chunks) >= crash_after:
            os._exit(3)  # a hard crash: no cleanup, no marker

    with Extractor(address, chunk_size=3, prefetch=1, progress=progress) as extractor:
        # Rank and world size come from the env.
        extractor.extract(paths, out, sharded=True, alignment="aligned")
    print(json.dumps({"rows": sum(chunks)}))
    """
)


def run_rank(address, out, listing, rank, world_size, crash_after=0):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size))
    env["CRASH_AFTER_CHUNKS"] = str(crash_after)
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, address, str(out), str(listing)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sharded_processes_with_a_crash_and_rerun(embed_server, photos, reference, tmp_path):
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps(photos))
    out = tmp_path / "shared" / "val.npy"
    out.parent.mkdir()
    world = 3
    procs = [
        run_rank(embed_server.address, out, listing, r, world, crash_after=2 if r == 1 else 0)
        for r in range(world)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 3, 0], results
    assert [json.loads(results[r][0])["rows"] for r in (0, 2)] == [10, 10]

    # Rank 1 died after 2 chunks of 3 rows: gather names it and gives up after the timeout.
    with pytest.raises(GatherTimeout) as info:
        gather(out, world_size=world, timeout=0.5, poll=0.1)
    assert info.value.missing == [1]
    assert "ranks [1] of world_size 3 did not mark their shard done within 0.5s" in str(info.value)
    with (
        Extractor(embed_server.address, progress=False) as extractor,
        pytest.raises(GatherTimeout, match=r"ranks \[1\]"),
    ):
        extractor.gather(out, world_size=world, timeout=0.2)

    rerun = run_rank(embed_server.address, out, listing, 1, world)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert json.loads(stdout)["rows"] == 10 - 6, "the rerun resumes after the committed rows"

    features, norms = gather(out, world_size=world, timeout=10, with_norms=True)
    assert features.shape == (30, 512)
    np.testing.assert_allclose(features, reference[0], atol=ATOL)
    np.testing.assert_allclose(norms, reference[1], rtol=1e-5)


def test_sharded_needs_a_file(embed_server, photos):
    with (
        Extractor(embed_server.address, progress=False) as extractor,
        pytest.raises(ValueError, match="pass out="),
    ):
        extractor.extract(photos, rank=0, world_size=2)
