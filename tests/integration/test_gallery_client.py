"""GalleryClient and `python client/gallery.py` (as a subprocess) against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adaface_client import (
    AlreadyExists,
    FailedPrecondition,
    GalleryClient,
    IdentityRef,
    InvalidArgument,
    NotFound,
)

from .gallery_support import REPO, crop, png, unit_vectors
from .server_harness import ServerThread, server_settings


@pytest.fixture(scope="module")
def server(ir18_repository, tmp_path_factory):
    repository, name = ir18_repository
    path = tmp_path_factory.mktemp("gallery_client") / "galleries.sqlite3"
    server = ServerThread(server_settings(repository, name, gallery_path=path)).start()
    yield server.wait_serving()
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with GalleryClient(server.address) as c:
        yield c


def test_client_round_trip(client, server, tmp_path):
    info = client.create_gallery("lib", metadata={"owner": "tests"})
    assert info.model_checksum == server.spec.checksum
    with pytest.raises(AlreadyExists, match="gallery 'lib' already exists"):
        client.create_gallery("lib")
    vecs = unit_vectors(4, 21)
    r = client.enroll(
        "lib", "ann", [vecs[0], png(crop(3))], metadata={"k": "v"}, alignment="aligned"
    )
    assert r.created and r.sample_count == 2 and all(r.sample_ids) and not r.errors
    r = client.add_samples("lib", "ann", [b"broken", vecs[1]], alignment="aligned")
    assert r.sample_ids[0] is None and r.errors[0][:2] == (0, "UNDECODABLE")
    assert r.sample_count == 3
    client.enroll("lib", "ben", vecs[2:4])  # an [m, D] matrix is m vectors
    with pytest.raises(NotFound, match="identity 'zed' not found in gallery 'lib'"):
        client.add_samples("lib", "zed", [vecs[0]])
    with pytest.raises(InvalidArgument, match=r"samples\[0\]\.vector: need 512"):
        client.enroll("lib", "bad", [np.ones(10, np.float32)])
    results = client.search("lib", np.stack([vecs[1], vecs[3]]), top_k=2)
    assert [r.matches[0].identity for r in results] == ["ann", "ben"]
    assert results[0].matches[0].score == pytest.approx(1.0, abs=1e-5)
    v = client.verify(IdentityRef("ann"), crop(3), gallery="lib", alignment="aligned")
    assert v.match and v.score > 0.9999 and v.a_sample_id > 0
    assert [i.identity for i in client.list_identities("lib", page_size=1)] == ["ann", "ben"]
    assert client.remove_samples("lib", [r.sample_ids[1]]) == 1
    assert client.remove_identity("lib", "ben") == 2
    out = tmp_path / "lib.gallery"
    assert client.export("lib", out) == out.stat().st_size
    copy = client.import_gallery(out, name="lib2")
    assert (copy.identity_count, copy.sample_count) == (1, 2)
    with pytest.raises(FailedPrecondition):
        client.search("lib", [vecs[0]], model_checksum="0" * 64)
    assert client.delete_gallery("lib2") == (1, 2)
    assert "lib2" not in [g.name for g in client.list_galleries()]


def run_cli(server, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "client/gallery.py", "--server", server.address, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def save(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_cli(server, tmp_path):
    photos = tmp_path / "people"
    save(photos / "alice" / "1.png", png(crop(31)))
    save(photos / "alice" / "2.png", png(crop(32)))
    save(photos / "bob" / "1.png", png(crop(33)))
    save(photos / "bob" / "broken.jpg", b"not a jpeg")
    probe = save(tmp_path / "probe.png", png(crop(33)))

    r = run_cli(server, "create", "cli")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cli\tidentities=0")
    r = run_cli(server, "enroll", "cli", photos, "--aligned")
    assert r.returncode == 1, r.stderr
    assert "enrolled 2 of 2 identities into cli (3 of 4 images; 0 identities failed)" in r.stdout
    assert "broken.jpg: UNDECODABLE" in r.stderr
    r = run_cli(server, "enroll", "cli", photos, "--aligned")
    assert r.returncode == 1 and "already exists" in r.stderr

    r = run_cli(server, "identities", "cli")
    assert r.returncode == 0 and r.stdout.splitlines() == ["alice\tsamples=2", "bob\tsamples=1"]
    r = run_cli(server, "search", "cli", probe, "--top-k", "2", "--json", "--aligned")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report[0]["matches"][0]["identity"] == "bob"
    assert report[0]["matches"][0]["score"] > 0.9999
    r = run_cli(server, "verify", "id:bob", probe, "--gallery", "cli", "--aligned")
    assert r.returncode == 0 and r.stdout.endswith(": MATCH\n"), r.stdout

    export = tmp_path / "cli.gallery"
    r = run_cli(server, "export", "cli", export)
    assert r.returncode == 0 and export.stat().st_size > 3 * 2048
    r = run_cli(server, "import", export, "--name", "cli_copy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cli_copy\tidentities=2\tsamples=3")

    seed = tmp_path / "gallery.pth"
    torch.save({"features": torch.randn(4, 512), "labels": ["x", "y", "x", "z"]}, seed)
    r = run_cli(server, "import", seed, "--name", "from_seed")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("from_seed\tidentities=3\tsamples=4")
    r = run_cli(server, "list")
    names = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert {"cli", "cli_copy", "from_seed"} <= set(names) and names == sorted(names)
    r = run_cli(server, "delete", "nope")
    assert r.returncode == 2 and "NOT_FOUND: gallery 'nope' not found" in r.stderr
