"""The SQLite gallery store and the export/import file formats, on real files."""

from __future__ import annotations

import io
import sqlite3

import numpy as np
import pytest
import torch

from adaface_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from adaface_server.gallery import store as db
from adaface_server.gallery.store import Store
from adaface_server.gallery.transfer import (
    TransferIdentity,
    export_stream,
    parse_native,
    parse_seed_pth,
)


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "sub" / "g.sqlite3")
    s.open()
    yield s
    s.close()


def test_pragmas_and_lock(store, tmp_path):
    conn = store.reader()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    second = Store(store.path)
    with pytest.raises(FailedPrecondition, match="in use by another server"):
        second.open()


def test_group_commit_isolates_failing_writes(store):
    gallery = store.submit(
        lambda c: (db.insert_gallery(c, "g", "c" * 64, "m", 4, {}), None)
    ).result()
    vectors = unit(2, 4, 0)
    done: list[str] = []

    def enroll(name: str, fail: bool):
        def op(conn: sqlite3.Connection):
            iid = db.insert_identity(conn, gallery.gallery_id, name, {})
            ids = db.insert_samples(conn, gallery.gallery_id, iid, vectors, np.zeros(2))
            if fail:
                raise AlreadyExists(f"{name} failed after writing")
            return ids, lambda: done.append(name)

        return op

    futures = [store.submit(enroll(f"i{k}", fail=k == 1)) for k in range(3)]
    ids0 = futures[0].result()
    with pytest.raises(AlreadyExists):
        futures[1].result()
    ids2 = futures[2].result()
    assert done == ["i0", "i2"]  # after-commit steps ran only for committed writes
    # Consecutive ids even with a rolled-back write in between.
    assert ids2.tolist() == [ids0[-1] + 1, ids0[-1] + 2]
    conn = store.reader()
    names = [r.name for r in db.list_identities(conn, gallery.gallery_id, "", 10)]
    assert names == ["i0", "i2"]
    blocks = list(db.iter_sample_blocks(conn, gallery.gallery_id, 4))
    np.testing.assert_array_equal(blocks[0][2], np.concatenate([vectors, vectors]))


def test_native_file_round_trip():
    idents = [
        TransferIdentity(
            "a", {"k": "v"}, 1.0, unit(2, 8, 1), np.asarray([1.0, 2.0]), [1, 2], [3.0, 4.0]
        ),
        TransferIdentity("b", {}, 2.0, np.empty((0, 8), np.float32), np.empty(0), [], []),
    ]
    header = {"name": "g", "model_checksum": "c" * 64, "model_name": "m", "dim": 8, "metadata": {}}
    data = b"".join(export_stream(header, idents))
    parsed = parse_native(data)
    assert (parsed.name, parsed.dim, parsed.model_checksum) == ("g", 8, "c" * 64)
    assert [i.name for i in parsed.identities] == ["a", "b"]
    np.testing.assert_array_equal(parsed.identities[0].vectors, idents[0].vectors)
    assert parsed.identities[0].metadata == {"k": "v"}
    for cut in (len(data) - 5, len(data) - 40, 40):
        with pytest.raises(InvalidArgument, match=r"^import: "):
            parse_native(data[:cut])
    with pytest.raises(InvalidArgument, match="bad magic"):
        parse_native(b"PK\x03\x04 a zip")


def test_seed_gallery_pth():
    buf = io.BytesIO()
    torch.save({"features": torch.randn(3, 8), "labels": torch.tensor([7, 5, 7])}, buf)
    parsed = parse_seed_pth(buf.getvalue(), "seed", "c" * 64)
    assert [(i.name, len(i.vectors)) for i in parsed.identities] == [("7", 2), ("5", 1)]
    buf = io.BytesIO()
    torch.save({"features": torch.randn(3, 8)}, buf)
    with pytest.raises(InvalidArgument, match="'features' and 'labels'"):
        parse_seed_pth(buf.getvalue(), "seed", "c" * 64)
