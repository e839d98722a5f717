"""The change log on real SQLite files: replicas on two store handles stay equal to the store."""

from __future__ import annotations

import numpy as np
import pytest

from adaface_server.config import parse_settings
from adaface_server.gallery import changelog
from adaface_server.gallery import store as db
from adaface_server.gallery.changelog import Replica
from adaface_server.gallery.index import Change, ExactIndex
from adaface_server.gallery.store import Store

DIM = 8


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_index(dim: int, capacity: int) -> ExactIndex:
    return ExactIndex(dim, "float32", 1 << 20, 0.25, max(capacity, 16))


@pytest.fixture
def stores(tmp_path):
    path = tmp_path / "g.sqlite3"
    first, second = Store(path), Store(path)
    first.open()
    second.open()
    yield first, second
    second.close()
    first.close()


def create(store: Store, replica: Replica, name: str) -> int:
    def op(conn):
        row = db.insert_gallery(conn, name, "c" * 64, "m", DIM, {})
        seq = changelog.append(conn, row.gallery_id, changelog.CREATE)
        g = changelog.LiveGallery(row, new_index(DIM, 0), 0, 0)

        def apply():
            replica.galleries[name] = g

        return row.gallery_id, lambda: replica.committed(seq, apply)

    return store.submit(op).result()


def enroll(store: Store, replica: Replica, gid: int, name: str, vectors: np.ndarray):
    def op(conn):
        iid = db.insert_identity(conn, gid, name, {})
        ids = db.insert_samples(conn, gid, iid, vectors, np.ones(len(vectors)))
        change = Change(
            add_keys=ids,
            add_labels=np.full(len(ids), iid, np.int64),
            add_vectors=vectors,
            names={iid: name},
            identity_delta=1,
        )
        seq = changelog.append(
            conn, gid, changelog.ADD, changelog.sample_change(ids, iid, name, 1, 1)
        )
        g = next(g for g in replica.galleries.values() if g.row.gallery_id == gid)

        def apply():
            g.index.apply([change])
            g.identities += 1
            g.samples += len(ids)

        return ids, lambda: replica.committed(seq, apply)

    return store.submit(op).result()


def remove_identity(store: Store, gid: int, name: str) -> None:
    def op(conn):
        found = db.find_identity(conn, gid, name)
        ids = db.delete_identity(conn, found.identity_id)
        changelog.append(conn, gid, changelog.REMOVE, changelog.removal(ids, -1, -1))
        return None, None

    store.submit(op).result()


def state(replica: Replica) -> dict:
    """gallery -> (identities, samples, {identity: sorted sample ids}) from memory."""
    out = {}
    for name, g in replica.galleries.items():
        snap = g.index.snapshot
        alive = snap.samples.alive_mask()
        per: dict[str, list[int]] = {}
        for key, label in zip(
            snap.samples.keys[alive].tolist(), snap.samples.labels[alive].tolist(), strict=True
        ):
            per.setdefault(snap.names[label], []).append(key)
        out[name] = (g.identities, g.samples, per, snap.identities)
    return out


def truth(store: Store) -> dict:
    """The same, read straight from the store (the reference)."""
    out = {}
    with store.snapshot() as conn:
        for row in db.load_galleries(conn):
            idents, live, samples = db.gallery_counts(conn, row.gallery_id)
            per: dict[str, list[int]] = {}
            for ident in db.list_identities(conn, row.gallery_id, "", 10_000):
                rows = db.identity_samples(conn, ident.identity_id, DIM, with_vectors=False)
                if rows:
                    per[ident.name] = [r.sample_id for r in rows]
            out[row.name] = (idents, samples, per, live)
    return out


def test_a_replica_on_another_handle_catches_up_to_every_write(stores):
    first, second = stores
    mine, other = Replica(first, new_index), Replica(second, new_index)
    mine.load()
    other.load()
    gid = create(first, mine, "g")
    enroll(first, mine, gid, "a", unit(2, 1))
    enroll(first, mine, gid, "b", unit(3, 2))
    assert "g" not in other.galleries  # nothing until it catches up
    other.sync()
    assert state(other) == state(mine) == truth(first)
    # Search gives the reference answer (plain numpy over the stored vectors).
    probe = unit(3, 2)[1:2]
    hits, _ = other.galleries["g"].index.search(probe, 1, None)
    assert hits[0][0].identity == "b"
    # A write through the other handle while `mine` is one behind: replayed from the log.
    enroll(second, other, gid, "c", unit(1, 3))
    enroll(first, mine, gid, "d", unit(1, 4))  # seq is 2 ahead: catch-up, then apply
    assert state(mine) == truth(first)
    assert mine.applied == changelog.latest_seq(first.reader())


def test_samples_removed_later_in_one_batch_are_skipped(stores):
    first, second = stores
    writer, behind = Replica(first, new_index), Replica(second, new_index)
    writer.load()
    behind.load()
    gid = create(first, writer, "g")
    enroll(first, writer, gid, "a", unit(2, 1))
    enroll(first, writer, gid, "b", unit(2, 2))
    remove_identity(first, gid, "a")  # the ADD of "a" now names rows that are gone
    behind.sync()
    assert state(behind) == truth(first)
    assert set(state(behind)["g"][2]) == {"b"}


def test_a_replica_behind_a_trimmed_log_reloads_from_the_store(stores):
    first, second = stores
    writer, behind = Replica(first, new_index), Replica(second, new_index)
    writer.load()
    behind.load()
    gid = create(first, writer, "g")
    for i in range(5):
        enroll(first, writer, gid, f"p{i}", unit(1, 10 + i))
    gone = first.submit(lambda conn: (changelog.trim(conn, 2), None)).result()
    assert gone == 4  # CREATE and three ADDs
    with first.snapshot() as conn:
        assert changelog.trimmed_through(conn) == 4
    reloads = behind.reloads
    behind.sync()
    assert behind.reloads == reloads + 1
    assert state(behind) == truth(first)
    # After the reload it follows the log again entry by entry.
    remove_identity(first, gid, "p0")
    behind.sync()
    assert behind.reloads == reloads + 1
    assert state(behind) == truth(first)


@pytest.mark.parametrize(
    "url",
    ["postgresql://u:hunter2@h/db", "postgresql://u@h/db?password=hunter2"],
)
def test_a_password_in_the_gallery_url_is_refused_without_echoing_it(url, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--gallery-url", url], env={})
    err = capsys.readouterr().err
    assert "--gallery-url must not hold a password" in err
    assert "hunter2" not in err
