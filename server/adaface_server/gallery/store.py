"""SQLite gallery store (WAL, synchronous=FULL): the source of truth, with group commit.

Several server processes may open one file: SQLite serialises their write transactions
(BEGIN IMMEDIATE waits up to the busy timeout), and each process follows the others'
writes through the change log (see changelog.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import resource
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    FailedPrecondition,
    Internal,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS galleries (
    gallery_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    model_checksum TEXT NOT NULL,
    model_name TEXT NOT NULL DEFAULT '',
    dim INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS identities (
    identity_id INTEGER PRIMARY KEY AUTOINCREMENT,
    gallery_id INTEGER NOT NULL REFERENCES galleries(gallery_id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    sample_count INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    UNIQUE (gallery_id, name)
);
CREATE TABLE IF NOT EXISTS samples (
    sample_id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id INTEGER NOT NULL REFERENCES identities(identity_id) ON DELETE CASCADE,
    gallery_id INTEGER NOT NULL,
    vector BLOB NOT NULL,
    norm REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_identity ON samples (identity_id);
CREATE INDEX IF NOT EXISTS samples_by_gallery ON samples (gallery_id, sample_id)
"""
# Schema version -> the statements that bring the previous version to it.
_MIGRATIONS: dict[int, list[str]] = {
    2: [
        "CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
        "gallery_id INTEGER NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL, "
        "created_at REAL NOT NULL)"
    ],
}
# How long (s) an idle process waits between looks at the change log.
POLL_SECONDS = 0.05
# Writes waiting when the writer wakes up are committed together: one fsync for all.
MAX_GROUP = 256
# How long (ms) the close-time checkpoint waits for a lingering reader before giving up.
CLOSE_CHECKPOINT_WAIT_MS = 1000

# An op runs inside the writer's transaction and returns (result, after_commit). It may run
# again in a new transaction (see Store._commit_group), so only after_commit may change
# anything outside the database.
Op = Callable[[sqlite3.Connection], tuple[Any, Callable[[], None] | None]]

# SQLite primary result codes (sqlite3.h) that mean the storage failed, not the request,
# with their messages (matched on Python 3.10, whose exceptions carry no code).
_SQLITE_FULL = 13
_CORRUPTION_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_STORAGE_CODES = {
    5: "database is locked",  # SQLITE_BUSY
    7: "out of memory",  # SQLITE_NOMEM
    8: "attempt to write a readonly database",  # SQLITE_READONLY
    10: "disk I/O error",  # SQLITE_IOERR (EFBIG, EIO, ...)
    11: "database disk image is malformed",  # SQLITE_CORRUPT
    _SQLITE_FULL: "database or disk is full",  # SQLITE_FULL (ENOSPC)
    14: "unable to open database file",  # SQLITE_CANTOPEN
    15: "locking protocol",  # SQLITE_PROTOCOL
    26: "file is not a database",  # SQLITE_NOTADB
}


@dataclass
class GalleryRow:
    gallery_id: int
    name: str
    model_checksum: str
    model_name: str
    dim: int
    metadata: dict[str, str]
    created_at: float


@dataclass
class IdentityRow:
    identity_id: int
    name: str
    metadata: dict[str, str]
    sample_count: int
    created_at: float


@dataclass
class SampleRow:
    sample_id: int
    vector: np.ndarray  # [dim] float32
    norm: float
    created_at: float


def storage_error(exc: BaseException, path: Path) -> ServiceError | None:
    """The client-facing error for a failure of the store's storage, or None for others.

    Every caller rolls the transaction back, so each message says nothing was written:
    the client may retry the same request once the cause is fixed.
    """
    if not isinstance(exc, sqlite3.Error):
        return None
    code = _primary_code(exc)
    if code not in _STORAGE_CODES:
        return None
    name = getattr(exc, "sqlite_errorname", None)
    cause = f"SQLite: {exc}" + (f", {name}" if name else "")
    if code == _SQLITE_FULL:
        return ResourceExhausted(
            f"gallery store {path}: the disk is full ({cause}{_free_space(path)}); nothing "
            "was written; free space on that file system and retry"
        )
    if code in _CORRUPTION_CODES:
        return Internal(
            f"gallery store {path} is damaged ({cause}); nothing was written; restore the "
            "file from a backup or an export"
        )
    # I/O errors, locks held by other processes, a read-only or vanished file: the server
    # is fine and nothing was written, so UNAVAILABLE tells clients to retry with backoff.
    return Unavailable(
        f"gallery store {path}: the write failed with a storage error ({cause}"
        f"{_file_size_limit()}); nothing was written; retry once the storage is healthy"
    )


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11: the extended code
    if code is not None:
        return code & 0xFF
    text = str(exc)
    return next((c for c, m in _STORAGE_CODES.items() if text.startswith(m)), None)


def _free_space(path: Path) -> str:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return ""
    return f"; {st.f_bavail * st.f_frsize} bytes free"


def _file_size_limit() -> str:
    # EFBIG from RLIMIT_FSIZE reaches SQLite as a plain write I/O error: name the limit.
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return ""
    return f"; this process may not grow a file past {soft} bytes (RLIMIT_FSIZE)"


class _TransactionLost(Exception):
    """A write failed in a way that made SQLite roll back the whole transaction."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error
        self.index = -1  # the write's place in its group, set by the caller


class Store:
    """One SQLite file, written by one thread that groups concurrent writes into one commit.

    A write's future resolves only after COMMIT returned (durable: WAL + synchronous=FULL)
    and its after-commit step (the index update) ran. A write that fails resolves with its
    error after its rollback, and its after-commit step never runs. Storage failures (disk
    full, I/O errors) become ServiceErrors (see storage_error): at COMMIT they fail every
    write of the transaction; one that makes SQLite drop the transaction mid-write fails
    that write alone and its neighbours run again. The writer thread outlives them all. A
    write whose future was cancelled before the writer took it is never run. Other
    processes may write the same file: their changes reach this one's memory through the
    change log.
    """

    description = "SQLite"

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        # Guards the queue's end: nothing may be queued behind the writer's stop sentinel.
        self._submit_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._connect()
        migrate(self._conn, str(self.path))
        self._thread = threading.Thread(target=self._write_loop, name="gallery-writer", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        _enable_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def close(self) -> None:
        """Finishes every queued write, checkpoints the WAL into the main file, closes."""
        with self._submit_lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        if self._conn is not None:
            self._checkpoint(self._conn)
            self._conn.close()
            self._conn = None

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copies the WAL into the main file and empties it: after a clean stop the
        .sqlite3 file alone holds everything (for backups and copies)."""
        try:
            conn.execute(f"PRAGMA busy_timeout={CLOSE_CHECKPOINT_WAIT_MS}")
            busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            log.warning(
                "gallery store %s: WAL checkpoint at close failed (%s); the WAL keeps every "
                "committed write and SQLite replays it on the next open",
                self.path,
                exc,
            )
            return
        if busy:
            # Normal with --workers N sharing the file: the last worker to stop empties it.
            log.info(
                "gallery store %s: WAL left for the other connections at close (another "
                "process is using the file); the WAL keeps every committed write and the last "
                "to close empties it",
                self.path,
            )
        else:
            log.info("gallery store %s: WAL checkpointed at close (%d frames)", self.path, frames)

    def reader(self) -> sqlite3.Connection:
        """This thread's read connection (WAL: reads never wait for the writer)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def connect(self) -> sqlite3.Connection:
        """A private connection (e.g. for a long export); the caller closes it."""
        return self._connect()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """This thread's reader inside one read transaction: a consistent view."""
        conn = self.reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT" if conn.in_transaction else "SELECT 1")

    def latest_seq(self) -> int:
        """The newest committed change-log seq: one index lookup on this thread's reader."""
        try:
            row = self.reader().execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path) or Internal(
                f"gallery store {self.path}: read failed: {exc}"
            ) from None
        return int(row[0])

    def wait_for_change(self, timeout: float) -> None:
        """Returns when the store may have changed: SQLite has no notifications, so after
        a short poll interval (the caller's catch-up query is one index lookup)."""
        self._wake.wait(min(timeout, POLL_SECONDS))
        self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    # -- writes ------------------------------------------------------------------------

    def submit(self, op: Op) -> Future:
        future: Future = Future()
        with self._submit_lock:
            if self._thread is None:
                raise Unavailable(f"gallery store {self.path} is closed (server stopping)")
            self._queue.put((op, future))
        return future

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            while len(group) < MAX_GROUP:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this group, then stop
                    break
                group.append(nxt)
            # A cancelled future's caller is gone: skip its write. The others become
            # RUNNING, so they can no longer be cancelled under the writer.
            group = [(op, f) for op, f in group if f.set_running_or_notify_cancel()]
            if not group:
                continue
            try:
                self._commit_group(group)
            except Exception as exc:
                # Last line of defence: one group must never stop every later write.
                log.exception("gallery writer: unexpected failure; %d writes failed", len(group))
                self._fail(group, Internal(f"gallery store {self.path}: write failed: {exc}"))

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()  # the last one broke (see _rollback)
        return self._conn

    def _begin(self, conn: Any) -> None:
        # IMMEDIATE: take the write lock now (waiting up to busy_timeout for another
        # process's transaction), so change-log seqs follow commit order.
        conn.execute("BEGIN IMMEDIATE")

    def _before_commit(self, conn: Any) -> None:
        """Hook run inside the transaction just before COMMIT."""

    def _storage_error(self, exc: BaseException) -> ServiceError | None:
        return storage_error(exc, self.path)

    def _commit_group(self, group: list[tuple[Op, Future]]) -> None:
        # A write whose failure made SQLite drop the whole transaction (it may on FULL or
        # IOERR, e.g. a big import spilling to a full disk) fails alone: its neighbours run
        # again in a new transaction. Each pass removes one write, so this ends.
        while group:
            try:
                self._commit(group)
                return
            except _TransactionLost as lost:
                _, future = group.pop(lost.index)
                future.set_exception(lost.error)

    def _commit(self, group: list[tuple[Op, Future]]) -> None:
        outcomes: list[tuple[bool, Any, Callable[[], None] | None]] = []
        conn: sqlite3.Connection | None = None
        try:
            conn = self._writer()
            self._begin(conn)
            for i, (op, _) in enumerate(group):
                try:
                    outcomes.append(self._run_op(conn, op))
                except _TransactionLost as lost:
                    lost.index = i
                    raise
            self._before_commit(conn)
            conn.execute("COMMIT")
        except _TransactionLost:
            if conn is not None:
                self._rollback(conn)
            raise
        except Exception as exc:
            error = self._group_error(exc, len(group))
            if conn is not None:
                self._rollback(conn)
            self._fail(group, error)
            return
        for (_, future), (ok, value, after) in zip(group, outcomes, strict=True):
            if ok and after is not None:
                try:
                    after()
                except Exception as exc:
                    log.exception("index update after a committed gallery write failed")
                    ok, value = False, Internal(f"index update failed: {exc}")
            if ok:
                future.set_result(value)
            else:
                if not isinstance(value, ServiceError):
                    log.error("gallery write failed", exc_info=value)
                future.set_exception(value)

    def _run_op(
        self, conn: sqlite3.Connection, op: Op
    ) -> tuple[bool, Any, Callable[[], None] | None]:
        # A savepoint per op: one failing write does not undo its neighbours.
        conn.execute("SAVEPOINT op")
        try:
            result, after = op(conn)
        except Exception as exc:
            mapped = self._storage_error(exc)
            if mapped is not None:
                log.error("gallery store %s: a write failed: %s", self.path, exc)
            if not conn.in_transaction:
                raise _TransactionLost(mapped or exc) from exc
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return False, mapped or exc, None
        conn.execute("RELEASE op")
        return True, result, after

    def _group_error(self, exc: Exception, count: int) -> ServiceError:
        mapped = self._storage_error(exc)
        if mapped is not None:
            # An expected operational condition: one line, no traceback.
            log.error("gallery store %s: %d writes rolled back: %s", self.path, count, exc)
            return mapped
        log.error("gallery commit failed; %d writes rolled back", count, exc_info=exc)
        return Internal(f"gallery store {self.path}: write failed ({exc}); nothing was written")

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            if conn.in_transaction:  # a failed COMMIT may already have rolled back
                conn.execute("ROLLBACK")
        except Exception:
            # The connection's state is unknown: drop it; the next group opens a new one.
            log.exception("gallery store %s: ROLLBACK failed; reopening the writer", self.path)
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None

    @staticmethod
    def _fail(group: list[tuple[Op, Future]], error: ServiceError) -> None:
        for _, future in group:
            if not future.done():
                # One instance per waiter: each raise extends its own traceback.
                future.set_exception(type(error)(*error.args))


def _enable_wal(conn: sqlite3.Connection, attempts: int = 100) -> None:
    """Switches the file to WAL, waiting out other processes doing the same.

    Two processes converting a new file at once can meet in a lock upgrade SQLite resolves
    by failing one at once, busy timeout or not ("database is locked": seen once when two
    --workers started on a new file); the loser retries until the other has finished."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def migrate(conn: Any, where: str) -> None:
    """Creates or upgrades the schema in one write transaction (safe when several
    processes start at once); refuses a store written by a newer server."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        apply_schema(
            conn,
            where,
            _SCHEMA.split(";"),
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '1')",
            _MIGRATIONS,
            SCHEMA_VERSION,
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def apply_schema(
    conn: Any,
    where: str,
    statements: Iterable[str],
    insert_first_version: str,
    migrations: dict[int, list[str]],
    version: int,
) -> None:
    """Inside an open write transaction, for either store: creates the tables, records
    version 1 for a new store, refuses a store newer than `version`, runs the migrations
    after the stored version and records `version`."""
    for statement in statements:
        conn.execute(statement)
    conn.execute(insert_first_version)
    stored = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    if stored > version:
        raise FailedPrecondition(
            f"gallery store {where} has schema version {stored}, newer than this "
            f"server knows ({version}); run a newer server"
        )
    for target in range(stored + 1, version + 1):
        for statement in migrations[target]:
            conn.execute(statement)
        log.info("gallery store %s: schema migrated to version %d", where, target)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))


# -- SQL helpers (run inside a write op or on a reader connection) ------------------------


def load_galleries(conn: sqlite3.Connection) -> list[GalleryRow]:
    rows = conn.execute(
        "SELECT gallery_id, name, model_checksum, model_name, dim, metadata, created_at "
        "FROM galleries ORDER BY name"
    ).fetchall()
    return [GalleryRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6]) for r in rows]


def insert_gallery(
    conn: sqlite3.Connection,
    name: str,
    model_checksum: str,
    model_name: str,
    dim: int,
    metadata: dict[str, str],
) -> GalleryRow:
    now = time.time()
    rows = conn.execute(
        "INSERT INTO galleries (name, model_checksum, model_name, dim, metadata, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?) RETURNING gallery_id",
        (name, model_checksum, model_name, dim, json.dumps(metadata), now),
    ).fetchall()
    return GalleryRow(rows[0][0], name, model_checksum, model_name, dim, metadata, now)


def gallery_row(conn: Any, gallery_id: int) -> GalleryRow | None:
    r = conn.execute(
        "SELECT gallery_id, name, model_checksum, model_name, dim, metadata, created_at "
        "FROM galleries WHERE gallery_id = ?",
        (gallery_id,),
    ).fetchone()
    return None if r is None else GalleryRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6])


def sample_rows(conn: Any, sample_ids: list[int]) -> dict[int, tuple[int, bytes]]:
    """sample_id -> (identity_id, vector bytes) for those of `sample_ids` still stored."""
    out: dict[int, tuple[int, bytes]] = {}
    for start in range(0, len(sample_ids), 500):
        part = sample_ids[start : start + 500]
        marks = ",".join("?" * len(part))
        for sid, owner, blob in conn.execute(
            f"SELECT sample_id, identity_id, vector FROM samples WHERE sample_id IN ({marks})",
            tuple(part),
        ).fetchall():
            out[int(sid)] = (int(owner), bytes(blob))
    return out


def gallery_exists(conn: sqlite3.Connection, gallery_id: int) -> bool:
    return (
        conn.execute("SELECT 1 FROM galleries WHERE gallery_id = ?", (gallery_id,)).fetchone()
        is not None
    )


def gallery_id_of(conn: sqlite3.Connection, name: str) -> int | None:
    row = conn.execute("SELECT gallery_id FROM galleries WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def gallery_counts(conn: sqlite3.Connection, gallery_id: int) -> tuple[int, int, int]:
    """(identities, identities with samples, samples)."""
    ident, live, samples = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN sample_count > 0 THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(sample_count), 0) "
        "FROM identities WHERE gallery_id = ?",
        (gallery_id,),
    ).fetchone()
    return ident, live, samples


def delete_gallery(conn: sqlite3.Connection, gallery_id: int) -> tuple[int, int]:
    identities, _, samples = gallery_counts(conn, gallery_id)
    # Samples first through their own index: the identity cascade would go row by row.
    conn.execute("DELETE FROM samples WHERE gallery_id = ?", (gallery_id,))
    conn.execute("DELETE FROM identities WHERE gallery_id = ?", (gallery_id,))
    conn.execute("DELETE FROM galleries WHERE gallery_id = ?", (gallery_id,))
    return identities, samples


def find_identity(conn: sqlite3.Connection, gallery_id: int, name: str) -> IdentityRow | None:
    row = conn.execute(
        "SELECT identity_id, name, metadata, sample_count, created_at FROM identities "
        "WHERE gallery_id = ? AND name = ?",
        (gallery_id, name),
    ).fetchone()
    return None if row is None else IdentityRow(row[0], row[1], json.loads(row[2]), row[3], row[4])


def insert_identity(
    conn: sqlite3.Connection,
    gallery_id: int,
    name: str,
    metadata: dict[str, str],
    created_at: float | None = None,
) -> int:
    rows = conn.execute(
        "INSERT INTO identities (gallery_id, name, metadata, created_at) VALUES (?, ?, ?, ?) "
        "RETURNING identity_id",
        (gallery_id, name, json.dumps(metadata), created_at or time.time()),
    ).fetchall()
    return rows[0][0]


def set_identity_metadata(conn: sqlite3.Connection, identity_id: int, metadata: dict) -> None:
    conn.execute(
        "UPDATE identities SET metadata = ? WHERE identity_id = ?",
        (json.dumps(metadata), identity_id),
    )


def insert_samples(
    conn: Any,
    gallery_id: int,
    identity_id: int,
    vectors: np.ndarray,
    norms: np.ndarray,
) -> np.ndarray:
    """Inserts unit float32 vectors; returns their sample ids (increasing)."""
    now = time.time()
    blobs = np.ascontiguousarray(vectors, dtype="<f4")
    ids = reserve_ids(conn, "samples", len(blobs))
    conn.executemany(
        "INSERT INTO samples (sample_id, identity_id, gallery_id, vector, norm, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [
            (int(sid), identity_id, gallery_id, b.tobytes(), float(n), now)
            for sid, b, n in zip(ids, blobs, norms, strict=True)
        ],
    )
    conn.execute(
        "UPDATE identities SET sample_count = sample_count + ? WHERE identity_id = ?",
        (len(blobs), identity_id),
    )
    return ids


def reserve_ids(conn: Any, table: str, count: int) -> np.ndarray:
    """`count` new increasing row ids for `table` (inside the write transaction, which no
    other writer shares: SQLite's write lock, PostgreSQL's advisory lock)."""
    reserve = getattr(conn, "reserve_ids", None)
    if reserve is not None:  # PostgreSQL: the table's sequence
        return reserve(table, count)
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    first = (row[0] if row else 0) + 1
    return np.arange(first, first + count, dtype=np.int64)


def bulk_insert(
    conn: Any, gallery_id: int, identities: list
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Inserts identities (TransferIdentity) with their unit vectors in id order.

    Returns (identity ids, sample ids, sample identity ids, vectors [N, dim], names).
    """
    now = time.time()
    ident_ids = reserve_ids(conn, "identities", len(identities))
    conn.executemany(
        "INSERT INTO identities (identity_id, gallery_id, name, metadata, sample_count, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (
            (
                int(iid),
                gallery_id,
                i.name,
                json.dumps(i.metadata),
                len(i.vectors),
                i.created_at or now,
            )
            for iid, i in zip(ident_ids, identities, strict=True)
        ),
    )
    counts = np.asarray([len(i.vectors) for i in identities], np.int64)
    labels = np.repeat(ident_ids, counts)
    sample_ids = reserve_ids(conn, "samples", int(counts.sum()))

    def rows():
        sids = iter(sample_ids.tolist())
        for iid, ident in zip(ident_ids.tolist(), identities, strict=True):
            blobs = np.ascontiguousarray(ident.vectors, dtype="<f4")
            for b, n in zip(blobs, ident.norms.tolist(), strict=True):
                yield next(sids), iid, gallery_id, b.tobytes(), float(n), now

    conn.executemany(
        "INSERT INTO samples (sample_id, identity_id, gallery_id, vector, norm, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        rows(),
    )
    dim = identities[0].vectors.shape[1] if identities else 0
    vectors = (
        np.concatenate([i.vectors for i in identities]).astype(np.float32)
        if identities
        else np.empty((0, dim), np.float32)
    )
    return ident_ids.tolist(), sample_ids, labels, vectors, [i.name for i in identities]


def sample_owners(
    conn: sqlite3.Connection, gallery_id: int, sample_ids: list[int]
) -> dict[int, int]:
    """sample_id -> identity_id for those of `sample_ids` stored in the gallery."""
    out: dict[int, int] = {}
    for start in range(0, len(sample_ids), 500):
        part = sample_ids[start : start + 500]
        marks = ",".join("?" * len(part))
        for sid, iid in conn.execute(
            f"SELECT sample_id, identity_id FROM samples WHERE gallery_id = ? "
            f"AND sample_id IN ({marks})",
            (gallery_id, *part),
        ):
            out[sid] = iid
    return out


def delete_samples(conn: sqlite3.Connection, owners: dict[int, int]) -> list[int]:
    """Deletes the samples; returns the identities left with no sample."""
    per_identity: dict[int, int] = {}
    for sid, iid in owners.items():
        conn.execute("DELETE FROM samples WHERE sample_id = ?", (sid,))
        per_identity[iid] = per_identity.get(iid, 0) + 1
    emptied = []
    for iid, n in per_identity.items():
        conn.execute(
            "UPDATE identities SET sample_count = sample_count - ? WHERE identity_id = ?",
            (n, iid),
        )
        left = conn.execute(
            "SELECT sample_count FROM identities WHERE identity_id = ?", (iid,)
        ).fetchone()[0]
        if left == 0:
            emptied.append(iid)
    return emptied


def delete_identity(conn: sqlite3.Connection, identity_id: int) -> list[int]:
    """Deletes the identity and its samples; returns the deleted sample ids."""
    ids = [
        r[0]
        for r in conn.execute("SELECT sample_id FROM samples WHERE identity_id = ?", (identity_id,))
    ]
    conn.execute("DELETE FROM samples WHERE identity_id = ?", (identity_id,))
    conn.execute("DELETE FROM identities WHERE identity_id = ?", (identity_id,))
    return ids


def identity_samples(
    conn: sqlite3.Connection, identity_id: int, dim: int, with_vectors: bool = True
) -> list[SampleRow]:
    column = "vector" if with_vectors else "NULL"
    rows = conn.execute(
        f"SELECT sample_id, {column}, norm, created_at FROM samples WHERE identity_id = ? "
        "ORDER BY sample_id",
        (identity_id,),
    ).fetchall()
    empty = np.empty(0, np.float32)
    return [
        SampleRow(r[0], np.frombuffer(r[1], "<f4").reshape(dim) if r[1] else empty, r[2], r[3])
        for r in rows
    ]


def list_identities(
    conn: sqlite3.Connection, gallery_id: int, after: str, limit: int
) -> list[IdentityRow]:
    rows = conn.execute(
        "SELECT identity_id, name, metadata, sample_count, created_at FROM identities "
        "WHERE gallery_id = ? AND name > ? ORDER BY name LIMIT ?",
        (gallery_id, after, limit),
    ).fetchall()
    return [IdentityRow(r[0], r[1], json.loads(r[2]), r[3], r[4]) for r in rows]


def identity_names(conn: sqlite3.Connection, gallery_id: int) -> dict[int, str]:
    return dict(
        conn.execute("SELECT identity_id, name FROM identities WHERE gallery_id = ?", (gallery_id,))
    )


def iter_sample_blocks(
    conn: sqlite3.Connection, gallery_id: int, dim: int, block: int = 65536
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(sample ids, identity ids, vectors [m, dim] float32) in sample-id order, blockwise."""
    sql = (
        "SELECT sample_id, identity_id, vector FROM samples WHERE gallery_id = ? ORDER BY sample_id"
    )
    # PostgreSQL: a server-side cursor in binary format (no hex-escaped vectors, bounded
    # memory); SQLite: a plain cursor.
    stream = getattr(conn, "stream_binary", None)
    cur = stream(sql, (gallery_id,)) if stream else conn.execute(sql, (gallery_id,))
    while rows := cur.fetchmany(block):
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        owners = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        vectors = np.frombuffer(b"".join(r[2] for r in rows), "<f4").reshape(len(rows), dim)
        yield ids, owners, vectors


def iter_export_rows(conn: sqlite3.Connection, gallery_id: int) -> Iterator[tuple]:
    """Identities (id order) joined with their samples (id order)."""
    return conn.execute(
        "SELECT i.identity_id, i.name, i.metadata, i.created_at, s.sample_id, s.norm, "
        "s.created_at, s.vector FROM identities i LEFT JOIN samples s "
        "ON s.identity_id = i.identity_id WHERE i.gallery_id = ? "
        "ORDER BY i.identity_id, s.sample_id",
        (gallery_id,),
    )
