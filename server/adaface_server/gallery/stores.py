"""The gallery store interface and the choice between its implementations (SQLite, PostgreSQL)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from ..config import Settings
from .store import Store as SqliteStore


class GalleryStore(Protocol):
    """What the gallery service needs from a store; it never knows which one it has.

    Writes are ops run inside the store's write transaction (`submit`); they use the SQL
    helpers of store.py, written in the SQL both stores share. `snapshot` gives a read
    connection inside one consistent read transaction; `latest_seq` is the cheap
    read-your-writes check; `wait_for_change` blocks until another process may have written
    (SQLite: a short poll; PostgreSQL: LISTEN/NOTIFY).
    """

    path: Path | str  # where the galleries live, as shown in messages (never a password)
    description: str

    def open(self) -> None: ...

    def close(self) -> None: ...

    def submit(self, op: Callable[[Any], tuple[Any, Callable[[], None] | None]]) -> Future: ...

    def connect(self) -> Any: ...

    def latest_seq(self) -> int: ...

    def snapshot(self) -> contextlib.AbstractContextManager[Any]: ...

    def wait_for_change(self, timeout: float) -> None: ...

    def wake(self) -> None: ...


def open_store(settings: Settings) -> GalleryStore:
    """The store the settings name (not yet opened): PostgreSQL when --gallery-url is set."""
    if settings.gallery_url:
        from .postgres import PostgresStore

        return PostgresStore(settings.gallery_url, settings.gallery_password_file)
    return SqliteStore(settings.gallery_path)
