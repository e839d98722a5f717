"""The sampling service: validate identities, embed image prototypes, kNN, plan the epoch."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Settings
from ..embedding import EmbeddingService
from ..errors import InvalidArgument
from ..preprocess.pipeline import ImageItem
from ..stopping import until_stopped
from .index import EpochPlan, plan_epoch
from .knn import Stopped
from .neighbours import neighbours, resolve
from .slots import BuildSlots

log = logging.getLogger(__name__)

MAX_DIM = 65536
# A batch's positions are computed and sent whole; beyond this one tiny request (a single
# identity with batch_size = num_instance = 2**32-1) made the server allocate ~32 GiB.
MAX_BATCH_SIZE = 65536
# Response chunks stay far below gRPC message limits and keep server memory per build small.
CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SamplingOptions:
    batch_size: int
    num_instance: int
    seed: int = 0
    epoch: int = 0
    dim: int = 0  # vector prototype length; 0: inferred
    flip: bool = False
    first_pass_in_order: bool = False  # stream starts in request order (the seed's)

    def validate(self) -> None:
        if self.num_instance < 1:
            raise InvalidArgument(f"options.num_instance: must be >= 1, got {self.num_instance}")
        if self.batch_size < 1:
            raise InvalidArgument(f"options.batch_size: must be >= 1, got {self.batch_size}")
        if self.batch_size % self.num_instance:
            raise InvalidArgument(
                f"options.batch_size: {self.batch_size} is not divisible by "
                f"options.num_instance {self.num_instance} (a batch is P identities x "
                "num_instance samples)"
            )
        if self.batch_size > MAX_BATCH_SIZE:
            raise InvalidArgument(
                f"options.batch_size: at most {MAX_BATCH_SIZE}, got {self.batch_size}"
            )
        if self.dim > MAX_DIM:
            raise InvalidArgument(f"options.dim: at most {MAX_DIM}, got {self.dim}")

    @property
    def identities_per_batch(self) -> int:
        return self.batch_size // self.num_instance


class PrototypeTable:
    """Identities as they stream in: counts, cursors and prototypes, checked as they come."""

    def __init__(self, options: SamplingOptions, max_identities: int) -> None:
        options.validate()
        self.options = options
        self.max_identities = max_identities
        self.dim = options.dim
        self.pids: list[str] = []
        self.counts = array.array("q")
        self.cursors = array.array("Q")
        self.vector_rows = array.array("q")
        self.vector_bytes = bytearray()
        self.images: list[tuple[int, ImageItem]] = []

    def __len__(self) -> int:
        return len(self.counts)

    def name(self, index: int) -> str:
        pid = self.pids[index]
        if len(pid) > 64:  # error details travel in a trailer that clients cap at 8 KiB
            return f"identities[{index}] (pid {pid[:64]!r}... ({len(pid)} characters))"
        return f"identities[{index}] (pid {pid!r})" if pid else f"identities[{index}]"

    def add(
        self,
        pid: str,
        sample_count: int,
        cursor: int,
        vector: bytes | None = None,
        image: ImageItem | None = None,
    ) -> int:
        """Appends one identity; returns its index. Exactly one of vector/image is set."""
        index = len(self.counts)
        if index >= self.max_identities:
            raise InvalidArgument(
                f"identities: at most {self.max_identities} per request "
                "(sampling_max_identities), got more"
            )
        self.pids.append(pid)
        self.counts.append(sample_count)
        self.cursors.append(cursor)
        if vector is not None:
            if not self.dim:
                self.dim = len(vector) // 4
            if len(vector) != 4 * self.dim or not 1 <= self.dim <= MAX_DIM:
                raise InvalidArgument(
                    f"{self.name(index)}.vector: need {self.dim} float32 values "
                    f"({4 * self.dim} bytes), got {len(vector)} bytes"
                )
            self.vector_rows.append(index)
            self.vector_bytes += vector
        elif image is not None:
            self.images.append((index, image))
        else:
            raise InvalidArgument(f"{self.name(index)}: set a prototype (vector or image)")
        return index

    def check(self) -> None:
        """Whole-request checks, once every identity has arrived."""
        n, p = len(self), self.options.identities_per_batch
        counts = np.frombuffer(self.counts, dtype=np.int64) if n else np.zeros(0, np.int64)
        empty = np.flatnonzero(counts < 1)
        if empty.size:
            raise InvalidArgument(
                f"{self.name(int(empty[0]))}.sample_count: is 0; every identity needs >= 1 "
                f"sample ({empty.size} of {n} identities have none)"
            )
        if n < p:
            raise InvalidArgument(
                f"identities: need at least P = batch_size / num_instance = "
                f"{self.options.batch_size} / {self.options.num_instance} = {p} identities, "
                f"got {n}"
            )
        vectors = self.vectors()
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if bad.size:
            row = int(bad[0])
            value = int(np.flatnonzero(~np.isfinite(vectors[row]))[0])
            raise InvalidArgument(
                f"{self.name(self.vector_rows[row])}.vector: values must be finite, "
                f"got {vectors[row, value]} at value {value}"
            )
        zero = np.flatnonzero(~vectors.any(axis=1))
        if zero.size:
            raise InvalidArgument(
                f"{self.name(self.vector_rows[int(zero[0])])}.vector: is all zeros "
                "(no direction for cosine similarity)"
            )

    def vectors(self) -> np.ndarray:
        return np.frombuffer(self.vector_bytes, dtype="<f4").reshape(-1, max(self.dim, 1))


@dataclass(frozen=True)
class EpochIndex:
    """A planned epoch and how it was made; positions are produced chunk by chunk."""

    plan: EpochPlan
    knn_precision: str
    model_name: str

    @property
    def position_dtype(self) -> str:
        return "<u4" if self.plan.num_samples < 2**32 else "<u8"


class SamplingService:
    """Builds epoch indices in worker threads, at most `sampling_max_builds` at a time."""

    def __init__(self, settings: Settings, embedding: EmbeddingService) -> None:
        self.settings = settings
        self.embedding = embedding
        self._workers = ThreadPoolExecutor(
            max_workers=settings.sampling_max_builds, thread_name_prefix="sampling"
        )
        folder = Path(settings.worker_state_dir) if settings.worker_state_dir else None
        self.slots = BuildSlots(settings.sampling_max_builds, folder)
        self.knn = resolve(settings)
        self._stops: set[threading.Event] = set()  # one per computation in the pool

    @property
    def _running(self) -> int:
        """Builds running in this process."""
        return self.slots.running

    def build_slot(self) -> contextlib.AbstractContextManager[None]:
        """Refuses at once rather than queueing when every build slot is taken (across the
        workers of a --workers N server)."""
        return self.slots.take()

    def table(self, options: SamplingOptions) -> PrototypeTable:
        return PrototypeTable(options, self.settings.sampling_max_identities)

    def images(self, table: PrototypeTable) -> PrototypeEmbedder:
        return PrototypeEmbedder(self.embedding, table)

    async def build(self, table: PrototypeTable, images: PrototypeEmbedder) -> EpochIndex:
        """Plans the epoch once every identity has arrived."""
        loop = asyncio.get_running_loop()
        # Checked before the remaining images are embedded: a bad request fails fast, and
        # off the event loop, since a million prototypes take a moment to scan.
        await loop.run_in_executor(self._workers, table.check)
        image_vectors = await images.finish()
        model = self.embedding.info().model_name if table.images else ""
        plan = await until_stopped(
            self._workers,
            lambda should_stop: self._plan(table, image_vectors, should_stop),
            self._stops,
        )
        return EpochIndex(plan, self.knn.label, model)

    def _plan(
        self,
        table: PrototypeTable,
        image_vectors: np.ndarray | None,
        should_stop: Callable[[], bool],
    ) -> EpochPlan:
        started = time.perf_counter()
        n, opts = len(table), table.options
        prototypes = np.empty((n, table.dim), dtype=np.float32)
        if table.vector_rows:
            prototypes[np.frombuffer(table.vector_rows, dtype=np.int64)] = table.vectors()
        if table.images:
            prototypes[[i for i, _ in table.images]] = image_vectors
        log.info("sampling: kNN over %d identities started", n)
        try:
            graph = neighbours(
                prototypes,
                opts.identities_per_batch - 1,
                self.knn,
                self.settings,
                should_stop=should_stop,
            )
            if should_stop():
                raise Stopped("stopped before planning")
        except Stopped as exc:
            log.info("sampling: build of %d identities stopped, its caller is gone (%s)", n, exc)
            raise
        knn_s = time.perf_counter() - started
        plan = plan_epoch(
            graph,
            np.frombuffer(table.counts, dtype=np.int64),
            np.frombuffer(table.cursors, dtype=np.uint64),
            opts.num_instance,
            opts.seed,
            opts.epoch,
            first_pass_in_order=opts.first_pass_in_order,
        )
        log.info(
            "sampling: epoch %d of %d identities (%d samples), P=%d x %d: kNN (%s on %s) %.2fs, "
            "plan %.2fs",
            opts.epoch,
            n,
            plan.num_samples,
            opts.identities_per_batch,
            opts.num_instance,
            self.knn.method,
            self.knn.device,
            knn_s,
            time.perf_counter() - started - knn_s,
        )
        return plan

    async def positions(self, index: EpochIndex) -> AsyncIterator[bytes]:
        """The epoch's positions as packed little-endian chunks of whole batches."""
        dtype = np.dtype(index.position_dtype)
        per_chunk = max(1, CHUNK_BYTES // (dtype.itemsize * index.plan.batch_size))
        chunks = index.plan.chunks(per_chunk)
        loop = asyncio.get_running_loop()
        done = object()
        while True:
            # Chunks are computed in the worker pool: the event loop keeps serving others.
            chunk = await loop.run_in_executor(self._workers, next, chunks, done)
            if chunk is done:
                return
            yield chunk.astype(dtype).tobytes()

    def cursor_chunks(self, index: EpochIndex) -> Iterator[bytes]:
        """The updated cursors, packed little-endian uint64, in chunks."""
        cursors = index.plan.cursors.astype("<u8")
        step = CHUNK_BYTES // 8
        for start in range(0, cursors.size, step):
            yield cursors[start : start + step].tobytes()

    def close(self) -> None:
        for stop in list(self._stops):
            stop.set()  # a computation still running ends at its next tile
        self._workers.shutdown(wait=False, cancel_futures=True)


class PrototypeEmbedder:
    """Embeds image prototypes in request-sized chunks while the stream is still arriving.

    `feed()` after each message starts full chunks and waits when `max_stream_inflight` are
    running, so a fast sender is slowed by gRPC flow control instead of piling up images.
    """

    def __init__(self, embedding: EmbeddingService, table: PrototypeTable) -> None:
        self.embedding = embedding
        self.table = table
        self.chunk = embedding.settings.max_images_per_request
        self.window = embedding.settings.max_stream_inflight
        self._sent = 0
        self._tasks: list[asyncio.Task[np.ndarray]] = []

    async def feed(self, final: bool = False) -> None:
        pending = len(self.table.images) - self._sent
        while pending >= self.chunk or (final and pending > 0):
            items = self.table.images[self._sent : self._sent + min(pending, self.chunk)]
            self._sent += len(items)
            pending -= len(items)
            self._tasks.append(asyncio.ensure_future(self._embed(items)))
            running = [t for t in self._tasks if not t.done()]
            if len(running) >= self.window:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in self._tasks:
                if task.done() and task.exception() is not None:
                    await self.cancel()
                    raise task.exception()  # type: ignore[misc]

    async def finish(self) -> np.ndarray | None:
        """Every image prototype's embedding, in identity order (None without images)."""
        try:
            await self.feed(final=True)
            parts = await asyncio.gather(*self._tasks)
        except BaseException:
            await self.cancel()
            raise
        if not parts:
            return None
        vectors = np.concatenate(parts)
        dim = vectors.shape[1]
        if self.table.dim and self.table.dim != dim:
            source = "options.dim" if self.table.options.dim else "vector prototypes"
            raise InvalidArgument(
                f"{source}: {self.table.dim} values, but image prototypes embed into {dim} "
                f"(model {self.embedding.info().model_name})"
            )
        self.table.dim = dim
        return vectors

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _embed(self, items: list[tuple[int, ImageItem]]) -> np.ndarray:
        outcomes = await self.embedding.embed([item for _, item in items], self.table.options.flip)
        for (index, _), outcome in zip(items, outcomes, strict=True):
            if not outcome.ok:
                # The embedder numbers images within its own batch: name the identity instead.
                message = outcome.error_message.split(": ", 1)[-1]
                raise InvalidArgument(
                    f"{self.table.name(index)}.image: {message} (reason {outcome.error_reason}); "
                    "every identity needs a prototype"
                )
        return np.stack([o.embedding for o in outcomes]).astype(np.float32)
