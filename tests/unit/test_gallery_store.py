"""The SQLite gallery store and the export/import file formats, on real files."""

from __future__ import annotations

import io
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from adaface_server.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
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


def test_pragmas_and_a_second_store_on_the_same_file(store, tmp_path):
    conn = store.reader()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    second = Store(store.path)
    second.open()  # no lock file: several processes share one store
    try:
        row = second.submit(lambda c: (db.insert_gallery(c, "g", "c" * 64, "m", 4, {}), None))
        gallery = row.result()
        seen = db.gallery_row(store.reader(), gallery.gallery_id)
        assert seen is not None and seen.name == "g"
    finally:
        second.close()
    assert not os.path.exists(f"{store.path}.lock")


def test_schema_v1_file_is_migrated_and_a_newer_one_refused(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(db._SCHEMA + ";")
    old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    old.commit()
    old.close()
    s = Store(path)
    s.open()
    conn = s.reader()
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(
        db.SCHEMA_VERSION
    )
    assert conn.execute("SELECT COUNT(*) FROM changes").fetchone()[0] == 0
    s.close()
    newer = sqlite3.connect(path)
    newer.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    newer.commit()
    newer.close()
    with pytest.raises(FailedPrecondition, match=r"schema version 99, newer than this server"):
        Store(path).open()


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


def _hold_writer(store: Store, *, max_pages_over: int | None = None) -> threading.Event:
    """Parks the writer thread in an op until the returned event is set, so the writes
    submitted meanwhile are committed as one group. With `max_pages_over`, the op first caps
    the file at its current size plus that many pages (SQLite then fails a write that would
    grow it further with SQLITE_FULL, "database or disk is full", as on a full disk)."""
    release, parked = threading.Event(), threading.Event()

    def op(conn: sqlite3.Connection):
        if max_pages_over is not None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages + max_pages_over}")
        parked.set()
        release.wait(30)
        return None, None

    store.submit(op)
    assert parked.wait(30)
    return release


def _enroll_op(gallery_id: int, name: str, vectors: np.ndarray, done: list[str]):
    def op(conn: sqlite3.Connection):
        iid = db.insert_identity(conn, gallery_id, name, {})
        ids = db.insert_samples(conn, gallery_id, iid, vectors, np.ones(len(vectors)))
        return ids, lambda: done.append(name)

    return op


def _names(store: Store, gallery_id: int) -> list[str]:
    return [r.name for r in db.list_identities(store.reader(), gallery_id, "", 100)]


def test_disk_full_mid_write_fails_that_write_alone(store):
    """SQLite drops the whole transaction on this SQLITE_FULL: the old writer answered every
    write of the group with INTERNAL "no such savepoint"; now the write that did not fit gets
    RESOURCE_EXHAUSTED and its neighbours are committed in a new transaction."""
    gallery = store.submit(lambda c: (db.insert_gallery(c, "g", "c" * 64, "m", 512, {}), None))
    gid = gallery.result().gallery_id
    done: list[str] = []
    release = _hold_writer(store, max_pages_over=8)
    small_a = store.submit(_enroll_op(gid, "a", unit(1, 512, 1), done))
    big = store.submit(_enroll_op(gid, "big", unit(64, 512, 2), done))  # 128 KiB: 32+ pages
    small_c = store.submit(_enroll_op(gid, "c", unit(1, 512, 3), done))
    release.set()
    with pytest.raises(ResourceExhausted) as err:
        big.result(30)
    message = str(err.value)
    assert message.startswith(f"gallery store {store.path}: the disk is full (SQLite: ")
    assert "database or disk is full" in message
    assert "nothing was written" in message
    assert small_a.result(30).tolist() == [1]
    assert small_c.result(30).tolist() == [2]  # ids stay consecutive after the retry
    assert done == ["a", "c"]  # no index update for the rolled-back write
    assert _names(store, gid) == ["a", "c"]
    # Room again: the same write now succeeds on the same writer thread.
    store.submit(lambda c: (c.execute("PRAGMA max_page_count = 1073741823"), None)).result(30)
    assert store.submit(_enroll_op(gid, "big", unit(64, 512, 2), done)).result(30).size == 64
    assert _names(store, gid) == ["a", "big", "c"]


def test_writer_survives_a_broken_connection_and_failed_rollback(store):
    """An op that breaks the writer's connection: the group fails with a clear INTERNAL,
    the ROLLBACK on the dead connection fails too, and the writer reconnects for the next."""
    gid = (
        store.submit(lambda c: (db.insert_gallery(c, "g", "c" * 64, "m", 4, {}), None))
        .result(30)
        .gallery_id
    )
    done: list[str] = []
    release = _hold_writer(store)
    neighbour = store.submit(_enroll_op(gid, "neighbour", unit(1, 4, 0), done))

    def breaks_connection(conn: sqlite3.Connection):
        db.insert_identity(conn, gid, "lost", {})
        conn.close()  # every later statement on it fails, ROLLBACK included
        return None, lambda: done.append("lost")

    broken = store.submit(breaks_connection)
    release.set()
    for future in (neighbour, broken):
        with pytest.raises(Internal, match=r"write failed \(Cannot operate on a closed database"):
            future.result(30)
    assert done == []
    assert store.submit(_enroll_op(gid, "after", unit(1, 4, 1), done)).result(30).size == 1
    assert done == ["after"]
    assert _names(store, gid) == ["after"]  # the open transaction died with its connection


def test_cancelled_write_is_skipped_and_writer_survives(store):
    """A caller that gave up (RPC cancelled, deadline passed) cancels its future: the
    writer used to die on set_result() of a cancelled future, hanging every later write."""
    ran: list[str] = []
    release = _hold_writer(store)
    cancelled = store.submit(lambda c: (ran.append("cancelled"), None))
    assert cancelled.cancel()
    kept = store.submit(lambda c: (ran.append("kept") or 7, None))
    release.set()
    assert kept.result(30) == 7
    assert ran == ["kept"]
    assert store.submit(lambda c: ("still writing", None)).result(30) == "still writing"


def test_close_checkpoints_the_wal_and_refuses_later_writes(tmp_path):
    path = tmp_path / "g.sqlite3"
    s = Store(path)
    s.open()
    # Another open connection (a backup tool, an export): without an explicit checkpoint
    # SQLite leaves the WAL as it is when a connection that is not the last one closes.
    other = sqlite3.connect(path)
    try:
        assert other.execute("SELECT COUNT(*) FROM galleries").fetchone()[0] == 0
        gid = (
            s.submit(lambda c: (db.insert_gallery(c, "g", "c" * 64, "m", 4, {}), None))
            .result(30)
            .gallery_id
        )
        futures = [s.submit(_enroll_op(gid, f"i{k}", unit(2, 4, k), [])) for k in range(20)]
        for f in futures:
            f.result(30)
        assert os.path.getsize(f"{path}-wal") > 0
        s.close()
        assert os.path.getsize(f"{path}-wal") == 0
        with pytest.raises(Unavailable, match=r"is closed \(server stopping\)"):
            s.submit(lambda c: (None, None))
        assert other.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 40
        assert other.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        other.close()


def test_a_damaged_file_is_internal_naming_it_and_other_errors_are_not_storage(tmp_path):
    path = tmp_path / "g.db"
    path.write_bytes(b"this is no database" * 512)
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError) as err:
        conn.execute("SELECT * FROM sqlite_master").fetchall()
    conn.close()
    error = db.storage_error(err.value, path)
    assert isinstance(error, Internal)
    assert str(error).startswith(f"gallery store {path} is damaged (SQLite: file is not a database")
    assert "restore the file from a backup or an export" in str(error)
    # A constraint violation is the request's problem, not the storage's.
    assert db.storage_error(sqlite3.IntegrityError("UNIQUE constraint failed"), path) is None
    assert db.storage_error(ValueError("x"), path) is None


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
        with pytest.raises(Cancelled, match=r"^import: the upload ended"):
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


def _open_at(path: str, barrier, errors) -> None:
    barrier.wait(60)
    try:
        for _ in range(10):  # reopening also meets the others' closing checkpoints
            s = Store(Path(path))
            s.open()
            s.close()
    except Exception as exc:  # reported to the parent, which fails the test
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path):
    """--workers N starts N processes on one new SQLite file at the same moment: each must
    wait for the others' locks (busy timeout), not fail with 'database is locked'."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    for attempt in range(2):
        path = str(tmp_path / f"galleries-{attempt}.sqlite3")
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_at, args=(path, barrier, errors)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []


def test_switching_to_wal_retries_while_another_process_holds_the_file(tmp_path):
    path = tmp_path / "new.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("CREATE TABLE t (x)")
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)  # fails at once when busy
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        conn.execute("PRAGMA journal_mode=WAL")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    db._enable_wal(conn)
    release.join()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    holder.close()
