"""PostgreSQL gallery store: one database shared by server processes on many machines.

The same group-committing writer as the SQLite store (store.Store), over psycopg 3: every
write transaction first takes one advisory lock, so change-log seqs follow commit order, and
sends a NOTIFY that wakes the other processes' followers. Reads come from a psycopg-pool
pool. The password comes from libpq's own sources (PGPASSWORD, PGPASSFILE) or a password
file, and never appears in a message: the store names itself by user, host, port and database.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from ..errors import Internal, ResourceExhausted, ServiceError, Unavailable
from .store import Store, apply_schema

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
CHANNEL = "adaface_gallery"
# Every write transaction holds this advisory lock (an arbitrary constant) until it ends.
WRITE_LOCK = 0x0ADAFACE
CONNECT_TIMEOUT_S = 5
POOL_SIZE = 4

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS galleries (gallery_id BIGSERIAL PRIMARY KEY, "
    "name TEXT NOT NULL UNIQUE, model_checksum TEXT NOT NULL, model_name TEXT NOT NULL "
    "DEFAULT '', dim INTEGER NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', "
    "created_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS identities (identity_id BIGSERIAL PRIMARY KEY, "
    "gallery_id BIGINT NOT NULL REFERENCES galleries (gallery_id) ON DELETE CASCADE, "
    "name TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', sample_count INTEGER NOT NULL "
    "DEFAULT 0, created_at DOUBLE PRECISION NOT NULL, UNIQUE (gallery_id, name))",
    "CREATE TABLE IF NOT EXISTS samples (sample_id BIGSERIAL PRIMARY KEY, "
    "identity_id BIGINT NOT NULL REFERENCES identities (identity_id) ON DELETE CASCADE, "
    "gallery_id BIGINT NOT NULL, vector BYTEA NOT NULL, norm DOUBLE PRECISION NOT NULL, "
    "created_at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX IF NOT EXISTS samples_by_identity ON samples (identity_id)",
    "CREATE INDEX IF NOT EXISTS samples_by_gallery ON samples (gallery_id, sample_id)",
]
# Schema version -> the statements that bring the previous version to it.
_MIGRATIONS: dict[int, list[str]] = {
    2: [
        "CREATE TABLE IF NOT EXISTS changes (seq BIGSERIAL PRIMARY KEY, gallery_id BIGINT "
        "NOT NULL, kind TEXT NOT NULL, payload TEXT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL)"
    ],
}
_cursor_numbers = itertools.count()
_SEQUENCES = {"samples": "samples_sample_id_seq", "identities": "identities_identity_id_seq"}


class PgConnection:
    """A psycopg connection speaking the SQL helpers' dialect ('?' placeholders)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Any = ()) -> psycopg.Cursor:
        return self.raw.execute(sql.replace("?", "%s"), params or None)

    def executemany(self, sql: str, rows: Any) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def stream_binary(self, sql: str, params: Any = ()) -> psycopg.ServerCursor:
        """A server-side cursor with binary results (inside the caller's transaction)."""
        cur = self.raw.cursor(name=f"stream{next(_cursor_numbers)}", binary=True)
        cur.execute(sql.replace("?", "%s"), params or None)
        return cur

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def reserve_ids(self, table: str, count: int) -> np.ndarray:
        if count == 0:
            return np.empty(0, np.int64)
        rows = self.raw.execute(
            "SELECT nextval(%s) FROM generate_series(1, %s)", (_SEQUENCES[table], count)
        ).fetchall()
        return np.asarray([r[0] for r in rows], np.int64)

    def close(self) -> None:
        self.raw.close()


def redacted(url: str) -> str:
    """The URL as shown in messages: user, host, port and database, never a password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = parts.get("host") or "localhost"
    return f"postgresql://{user}{host}:{parts.get('port') or 5432}/{parts.get('dbname', '')}"


def url_has_password(url: str) -> bool:
    try:
        return bool(conninfo_to_dict(url).get("password"))
    except psycopg.ProgrammingError:
        return False


class PostgresStore(Store):
    """The gallery store in one PostgreSQL database (see the module docstring)."""

    description = "PostgreSQL"

    def __init__(self, url: str, password_file: str = "") -> None:
        super().__init__(Path("."))
        self.url = url
        self.path = redacted(url)  # type: ignore[assignment]
        self._kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S}
        if password_file:
            lines = Path(password_file).expanduser().read_text().splitlines()
            self._kwargs["password"] = lines[0] if lines else ""
        self._pool: psycopg_pool.ConnectionPool | None = None
        self._seq_pool: psycopg_pool.ConnectionPool | None = None
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        self._woken = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        conn = self._connect()
        try:
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._pool = psycopg_pool.ConnectionPool(
            self.url,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs=self._kwargs,
            timeout=CONNECT_TIMEOUT_S,
            check=psycopg_pool.ConnectionPool.check_connection,
            open=True,
            name="gallery-readers",
        )
        self._seq_pool = psycopg_pool.ConnectionPool(
            self.url,
            min_size=1,
            max_size=2,
            kwargs=self._kwargs,
            timeout=CONNECT_TIMEOUT_S,
            open=True,
            name="gallery-seq",
        )
        self._thread = threading.Thread(target=self._write_loop, name="gallery-writer", daemon=True)
        self._thread.start()

    def _connect(self) -> PgConnection:  # type: ignore[override]
        try:
            return PgConnection(psycopg.connect(self.url, **self._kwargs))
        except psycopg.Error as exc:
            raise self._unreachable(exc) from None

    def _migrate(self, conn: PgConnection) -> None:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
            apply_schema(
                conn,
                str(self.path),
                _SCHEMA,
                "INSERT INTO meta (key, value) VALUES ('schema_version', '1') "
                "ON CONFLICT (key) DO NOTHING",
                _MIGRATIONS,
                SCHEMA_VERSION,
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._submit_lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()
        for pool in (self._pool, self._seq_pool):
            if pool is not None:
                pool.close()
        self._pool = self._seq_pool = None
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    # -- reads ---------------------------------------------------------------------------

    def reader(self) -> Any:
        raise Internal("PostgreSQL store: read through snapshot()")

    def connect(self) -> PgConnection:
        return self._connect()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[PgConnection]:
        if self._pool is None:
            raise Unavailable(f"gallery store {self.path} is closed")
        try:
            with self._pool.connection() as raw:
                conn = PgConnection(raw)
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    yield conn
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            raise self._unreachable(exc) from None

    def latest_seq(self) -> int:
        """The newest committed change-log seq: one round trip. Its own small pool skips
        the checked pool's health check (a second round trip on every read); a query on a
        connection the server dropped (a restart) runs again once on a fresh one."""
        if self._seq_pool is None:
            raise Unavailable(f"gallery store {self.path} is closed")
        for attempt in (1, 2):
            try:
                with self._seq_pool.connection() as raw:
                    row = raw.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
                    return int(row[0])
            except psycopg_pool.PoolTimeout as exc:
                raise self._unreachable(exc) from None
            except psycopg.OperationalError as exc:
                if attempt == 2:
                    raise self._unreachable(exc) from None
        raise AssertionError("unreachable")

    def wait_for_change(self, timeout: float) -> None:
        """Blocks until a NOTIFY from a committed write (any process) or `timeout`."""
        if self._woken.is_set():
            self._woken.clear()
            return
        try:
            with self._listener_lock:
                if self._listener is None or self._listener.closed:
                    self._listener = psycopg.connect(self.url, **self._kwargs)
                    self._listener.execute(f"LISTEN {CHANNEL}")
                listener = self._listener
            for _ in listener.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            with self._listener_lock:
                if self._listener is not None:
                    with contextlib.suppress(psycopg.Error):
                        self._listener.close()
                    self._listener = None
            raise self._unreachable(exc) from None

    def wake(self) -> None:
        self._woken.set()
        with self._listener_lock:
            if self._listener is not None:
                # Ends a notifies() wait from another thread.
                with contextlib.suppress(Exception):
                    self._listener.cancel_safe(timeout=1)

    # -- writes --------------------------------------------------------------------------

    def _begin(self, conn: Any) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))

    def _before_commit(self, conn: Any) -> None:
        conn.execute(f"NOTIFY {CHANNEL}")

    def _rollback(self, conn: Any) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            # A broken connection (server gone): drop it; the next group opens a new one.
            with contextlib.suppress(Exception):
                conn.close()
            self._conn = None

    def _storage_error(self, exc: BaseException) -> ServiceError | None:
        if isinstance(exc, ServiceError):  # e.g. Unavailable from a failed reconnect
            return exc
        if isinstance(exc, pg_errors.DiskFull):
            return ResourceExhausted(
                f"gallery store {self.path}: the database server's disk is full; nothing "
                "was written; free space there and retry"
            )
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return self._unreachable(exc)
        return None

    def _unreachable(self, exc: BaseException) -> ServiceError:
        if isinstance(exc, ServiceError):
            return exc
        return Unavailable(
            f"gallery store {self.path} is unreachable ({type(exc).__name__}); nothing was "
            "written; retry once the database is back"
        )
