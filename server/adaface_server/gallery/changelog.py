"""The gallery change log: numbered changes written with each commit, replayed by every process.

Every write appends one entry (a monotonic `seq`) in the transaction that makes the change.
Each server process keeps its in-memory galleries (a Replica) and applies the entries in
`seq` order: its own right after they commit, other processes' ones when it catches up
(before each read, and in the background when the store signals a change). Entries carry
ids, not vectors: a replica reads the rows an entry names from the store, inside one read
snapshot, so an entry whose rows a later entry of the same batch removed applies as the
removal it is followed by. Old entries may be trimmed; a replica that fell behind the
trimmed point reloads every gallery from the store.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import store as db
from .index import Change, ExactIndex
from .records import GalleryView
from .store import GalleryRow

log = logging.getLogger(__name__)

# Entry kinds.
CREATE = "create"  # a gallery was created (its row is in the store)
DROP = "drop"  # a gallery was deleted
ADD = "add"  # samples added: ids, identity id/name, counter deltas
REMOVE = "remove"  # samples removed: ids, counter deltas
RELOAD = "reload"  # many rows changed at once (import): rebuild the gallery from the store

NewIndex = Callable[[int, int], ExactIndex]  # (dim, capacity) -> empty index


def append(conn: Any, gallery_id: int, kind: str, payload: dict | None = None) -> int:
    """Appends an entry inside the caller's write transaction; returns its seq."""
    rows = conn.execute(
        "INSERT INTO changes (gallery_id, kind, payload, created_at) VALUES (?, ?, ?, ?) "
        "RETURNING seq",
        (gallery_id, kind, json.dumps(payload or {}, separators=(",", ":")), time.time()),
    ).fetchall()
    return int(rows[0][0])


def latest_seq(conn: Any) -> int:
    """The newest committed entry's seq (0 for none): one index lookup."""
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])


def trimmed_through(conn: Any) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'log_trimmed_through'").fetchone()
    return int(row[0]) if row else 0


def trim(conn: Any, keep: int) -> int:
    """Deletes all but the newest `keep` entries (inside a write); returns how many went."""
    newest = latest_seq(conn)
    cut = newest - keep
    if cut <= trimmed_through(conn):
        return 0
    gone = conn.execute("DELETE FROM changes WHERE seq <= ?", (cut,)).rowcount
    conn.execute("DELETE FROM meta WHERE key = 'log_trimmed_through'")
    conn.execute("INSERT INTO meta (key, value) VALUES ('log_trimmed_through', ?)", (str(cut),))
    return gone


def sample_change(ids: np.ndarray, identity_id: int, name: str, identities: int, live: int) -> dict:
    """The payload of an ADD entry."""
    return {
        "ids": [int(i) for i in ids],
        "identity_id": identity_id,
        "name": name,
        "identities": identities,
        "live": live,
    }


def removal(ids: list[int] | np.ndarray, identities: int, live: int) -> dict:
    """The payload of a REMOVE entry."""
    return {"ids": [int(i) for i in ids], "identities": identities, "live": live}


class LiveGallery:
    """In-memory state of one gallery; changed only under its Replica's lock."""

    def __init__(self, row: GalleryRow, index: ExactIndex, identities: int, samples: int):
        self.row = row
        self.index = index
        self.identities = identities
        self.samples = samples

    def view(self) -> GalleryView:
        r = self.row
        return GalleryView(
            name=r.name,
            model_checksum=r.model_checksum,
            model_name=r.model_name,
            dim=r.dim,
            identity_count=self.identities,
            sample_count=self.samples,
            created_at=r.created_at,
            metadata=dict(r.metadata),
            index=self.index.kind,
            dtype=self.index.dtype,
            index_bytes=self.index.stats().nbytes,
        )


class Replica:
    """This process's copy of every gallery, kept in step with the store's change log.

    `galleries` is replaced or mutated only under the lock; readers take references
    without locking (a dict lookup and a gallery's index snapshot are atomic).
    """

    def __init__(self, store: Any, new_index: NewIndex) -> None:
        self.store = store
        self.new_index = new_index
        self.galleries: dict[str, LiveGallery] = {}
        self.applied = 0  # seq of the newest entry reflected in memory
        self.reloads = 0
        self._lock = threading.RLock()

    # -- whole reloads ------------------------------------------------------------------

    def load(self) -> None:
        """Rebuilds every gallery from one consistent read of the store."""
        with self._lock, self.store.snapshot() as conn:
            self._reload(conn)

    def _reload(self, conn: Any) -> None:
        seq = latest_seq(conn)
        self.galleries = {row.name: self.rebuild(conn, row) for row in db.load_galleries(conn)}
        self.applied = seq
        self.reloads += 1

    def rebuild(self, conn: Any, row: GalleryRow) -> LiveGallery:
        identities, live, samples = db.gallery_counts(conn, row.gallery_id)
        index = self.new_index(row.dim, samples)
        names = db.identity_names(conn, row.gallery_id)
        first = True
        for keys, labels, vectors in db.iter_sample_blocks(conn, row.gallery_id, row.dim):
            index.apply(
                [
                    Change(
                        add_keys=keys,
                        add_labels=labels,
                        add_vectors=vectors,
                        names=names if first else {},
                        identity_delta=live if first else 0,
                    )
                ]
            )
            first = False
        if first:
            index.apply([Change(names=names, identity_delta=live)])
        return LiveGallery(row, index, identities, samples)

    # -- own writes ---------------------------------------------------------------------

    def committed(self, seq: int, apply: Callable[[], None]) -> None:
        """After this process committed entry `seq`: applies it directly when it is the
        next one, else replays the log up to it (other processes wrote in between)."""
        with self._lock:
            if seq <= self.applied:
                return  # the background catch-up got there first
            if seq == self.applied + 1:
                apply()
                self.applied = seq
                return
            try:
                self.catch_up()
            except Exception as exc:
                # The write is committed and acknowledged all the same; `applied` did not
                # move, so the next read's sync (or the follower) replays it.
                log.warning("gallery change log: catch-up after a commit failed: %s", exc)

    # -- catch-up -----------------------------------------------------------------------

    def sync(self) -> None:
        """Read-your-writes: one cheap query, and a replay when the store is ahead."""
        if self.store.latest_seq() <= self.applied:
            return
        self.catch_up()

    def catch_up(self) -> None:
        with self._lock, self.store.snapshot() as conn:
            if self.applied < trimmed_through(conn):
                log.warning(
                    "gallery change log trimmed past this process's position (seq %d): "
                    "reloading every gallery from the store",
                    self.applied,
                )
                self._reload(conn)
                return
            entries = conn.execute(
                "SELECT seq, gallery_id, kind, payload FROM changes WHERE seq > ? ORDER BY seq",
                (self.applied,),
            ).fetchall()
            payloads = [json.loads(e[3]) for e in entries]
            # Every added row of the batch in one read (not one round trip per entry).
            added = db.sample_rows(
                conn,
                [
                    i
                    for e, p in zip(entries, payloads, strict=True)
                    if e[2] == ADD
                    for i in p["ids"]
                ],
            )
            rebuilt: set[int] = set()  # galleries read whole from this snapshot
            for (seq, gallery_id, kind, _), p in zip(entries, payloads, strict=True):
                if gallery_id not in rebuilt:
                    self._apply(conn, gallery_id, kind, p, rebuilt, added)
                self.applied = int(seq)

    def _by_id(self, gallery_id: int) -> LiveGallery | None:
        return next((g for g in self.galleries.values() if g.row.gallery_id == gallery_id), None)

    def _apply(
        self,
        conn: Any,
        gallery_id: int,
        kind: str,
        p: dict,
        rebuilt: set[int],
        added: dict[int, tuple[int, bytes]],
    ) -> None:
        g = self._by_id(gallery_id)
        if kind in (CREATE, RELOAD):
            row = db.gallery_row(conn, gallery_id)
            if row is None:  # deleted later in this batch
                if g is not None:
                    self.galleries.pop(g.row.name, None)
                return
            self.galleries[row.name] = self.rebuild(conn, row)
            rebuilt.add(gallery_id)
        elif kind == DROP:
            if g is not None:
                self.galleries.pop(g.row.name, None)
        elif g is None:
            return  # a gallery this snapshot no longer holds
        elif kind == ADD:
            # Rows a later entry of this batch removed are gone from the snapshot: skipped.
            present = [i for i in p["ids"] if i in added]
            keys = np.asarray(present, np.int64)
            labels = np.asarray([added[i][0] for i in present], np.int64)
            vectors = np.frombuffer(b"".join(added[i][1] for i in present), "<f4").reshape(
                len(present), g.row.dim
            )
            g.index.apply(
                [
                    Change(
                        add_keys=keys,
                        add_labels=labels,
                        add_vectors=vectors,
                        names={int(p["identity_id"]): p["name"]},
                        identity_delta=int(p["live"]),
                    )
                ]
            )
            g.identities += int(p["identities"])
            g.samples += len(p["ids"])
        elif kind == REMOVE:
            g.index.apply(
                [
                    Change(
                        remove_keys=np.asarray(p["ids"], np.int64),
                        identity_delta=int(p["live"]),
                    )
                ]
            )
            g.identities += int(p["identities"])
            g.samples -= len(p["ids"])
        else:
            log.error("gallery change log: unknown entry kind %r ignored", kind)


class Follower:
    """A thread that keeps a Replica current while the process is idle."""

    def __init__(self, replica: Replica, trim_keep: int, trim_every: float = 60.0) -> None:
        self.replica = replica
        self.trim_keep = trim_keep
        self.trim_every = trim_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gallery-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.replica.store.wake()
        self._thread.join(10)

    def _run(self) -> None:
        store = self.replica.store
        next_trim = time.monotonic() + self.trim_every
        failing = False
        while not self._stop.is_set():
            try:
                store.wait_for_change(1.0)
                if self._stop.is_set():
                    return
                self.replica.sync()
                if self.trim_keep and time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + self.trim_every
                    store.submit(lambda conn: (trim(conn, self.trim_keep), None)).result()
                if failing:
                    log.info("gallery change log: catching up again")
                failing = False
            except Exception as exc:  # the store is down: retry, quietly after the first
                if not failing:
                    log.warning("gallery change log: catch-up failed (%s); retrying", exc)
                failing = True
                self._stop.wait(1.0)
