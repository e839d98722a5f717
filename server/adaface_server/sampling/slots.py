"""Build slots shared by every worker process of one server.

A lone server counts its running builds in memory. Pre-forked workers (--workers N) share
`sampling_max_builds` slots through lock files in the supervisor's state folder: a build
holds an exclusive flock on one `build-slot-<i>` file, and the kernel releases it when the
build ends or its process dies, so a crashed worker never leaks a slot."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ResourceExhausted


class BuildSlots:
    """At most `limit` builds at once across every process sharing `folder` (None: this
    process only). Taking one never waits: a full house is RESOURCE_EXHAUSTED at once."""

    def __init__(self, limit: int, folder: Path | None = None) -> None:
        self.limit = limit
        self._folder = folder
        self.running = 0  # builds of this process

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        with self._shared() if self._folder is not None else self._local():
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1

    def _refuse(self, scope: str) -> ResourceExhausted:
        return ResourceExhausted(
            f"sampling: {self.limit} index builds already running{scope} "
            "(sampling_max_builds); retry later"
        )

    @contextlib.contextmanager
    def _local(self) -> Iterator[None]:
        if self.running >= self.limit:
            raise self._refuse("")
        yield

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        assert self._folder is not None
        for i in range(self.limit):
            fd = os.open(self._folder / f"build-slot-{i}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield
            finally:
                os.close(fd)  # closing the last descriptor releases the lock
            return
        raise self._refuse(" across the server's workers")
