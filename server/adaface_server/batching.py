"""Dynamic batching: rows of concurrent requests coalesced into one forward pass."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import DeadlineExceeded, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray], Awaitable[tuple[np.ndarray, np.ndarray]]]


@dataclass(eq=False)
class _Job:
    rows: np.ndarray
    group: int
    future: asyncio.Future
    deadline: float | None = None  # time.monotonic(); past it the rows are dropped unrun
    taken: int = 0  # rows handed to a batch so far
    finished: int = 0  # rows whose outputs arrived
    outputs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


class DynamicBatcher:
    """Runs submitted rows through `infer` in batches, one batch at a time.

    Two knobs:
      * ``max_batch_size`` — most rows in one forward pass (the model's limit).
      * ``max_queue`` — most rows waiting; a submission beyond it fails at once with
        RESOURCE_EXHAUSTED instead of queueing without bound.

    There is no timer: when the model is idle a lone request runs at once; while a batch
    runs, new rows accumulate and the next batch takes all of them (up to the limit) the
    moment the model is free. Rows of one group (an image and its flip) never straddle two
    batches. A failed batch fails every request that had rows in it.
    """

    def __init__(
        self,
        infer: InferFn,
        max_batch_size: int,
        max_queue: int,
        on_drop: Callable[[int], object] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches_run = 0
        self.rows_run = 0
        self.rows_dropped = 0  # never run: their caller left or its deadline passed
        self._on_drop = on_drop

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(Unavailable("server is shutting down"))
        self._queued_rows = 0

    async def submit(
        self, rows: np.ndarray, group: int = 1, deadline: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns (embeddings, norms) for `rows`, in order. `group` rows stay together.

        Rows still queued at `deadline` (time.monotonic()) are dropped, not computed."""
        n = len(rows)
        if n == 0 or n % group or group > self.max_batch_size:
            raise ValueError(f"bad submission: {n} rows in groups of {group}")
        if self._task is None:
            raise Unavailable("the model is not ready")
        if self._queued_rows + n > self.max_queue:
            raise ResourceExhausted(
                f"server overloaded: {self._queued_rows} images queued for the model, "
                f"{n} more would exceed the queue limit of {self.max_queue} (max_queue)"
            )
        job = _Job(
            rows=rows,
            group=group,
            future=asyncio.get_running_loop().create_future(),
            deadline=deadline,
        )
        self._queue.append(job)
        self._queued_rows += n
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The caller went away (deadline, disconnect): drop rows not yet in a batch.
            if job in self._queue:
                self._queue.remove(job)
                self._queued_rows -= n - job.taken
                self._dropped(n - job.taken)
            raise

    def _take_batch(self) -> list[tuple[_Job, int, int]]:
        parts: list[tuple[_Job, int, int]] = []
        room = self.max_batch_size
        now = time.monotonic()
        while self._queue and room > 0:
            job = self._queue[0]
            if job.taken == 0 and job.deadline is not None and now >= job.deadline:
                self._queue.popleft()
                self._queued_rows -= len(job.rows)
                self._dropped(len(job.rows))
                if not job.future.done():
                    job.future.set_exception(
                        DeadlineExceeded("deadline exceeded while queued for the model")
                    )
                continue
            remaining = len(job.rows) - job.taken
            take = min(remaining, room)
            take -= take % job.group
            if take == 0:
                break
            parts.append((job, job.taken, job.taken + take))
            job.taken += take
            room -= take
            self._queued_rows -= take
            if job.taken == len(job.rows):
                self._queue.popleft()
        return parts

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            parts = self._take_batch()
            if not parts:  # everything queued had expired
                continue
            if len(parts) == 1:
                job, start, stop = parts[0]
                batch = job.rows[start:stop]
            else:
                batch = np.concatenate([job.rows[a:b] for job, a, b in parts])
            try:
                embeddings, norms = await self._infer(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("batch of %d rows failed: %s", len(batch), exc, exc_info=True)
                self._fail({job for job, _, _ in parts}, exc)
                continue
            self.batches_run += 1
            self.rows_run += len(batch)
            offset = 0
            for job, a, b in parts:
                count = b - a
                job.outputs.append(
                    (embeddings[offset : offset + count], norms[offset : offset + count])
                )
                offset += count
                job.finished += count
                if job.finished == len(job.rows) and not job.future.done():
                    emb = np.concatenate([e for e, _ in job.outputs])
                    nrm = np.concatenate([n for _, n in job.outputs])
                    job.future.set_result((emb, nrm))

    def _dropped(self, rows: int) -> None:
        self.rows_dropped += rows
        if self._on_drop is not None:
            self._on_drop(rows)

    def _fail(self, jobs: set[_Job], exc: Exception) -> None:
        for job in jobs:
            if job in self._queue:
                self._queue.remove(job)
                self._queued_rows -= len(job.rows) - job.taken
            if not job.future.done():
                job.future.set_exception(exc)
