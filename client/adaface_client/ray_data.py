"""Bulk extraction on Ray Data: a map_batches callable class, and folder or manifest -> Parquet.

Optional: ``pip install 'adaface-client[ray]'`` (Ray Data, with pyarrow). `EmbedBatches`
itself needs only this package: Ray constructs one per actor of an actor pool, each holding
one client, and calls it on batches of rows.

    ds = ray.data.read_csv("train.csv")  # a column "path" (and any others, kept)
    ds = ds.map_batches(EmbedBatches, fn_constructor_kwargs={"servers": ["lb:50051"]},
                        concurrency=8, batch_size=64, batch_format="numpy")

adds columns ``embedding`` (float32 [D] per row; NaN when the image failed), ``norm`` and
``error`` ("" or "REASON: message"); a failed image never fails the batch.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaface_client.client import (
    AdafaceError,
    AlignmentLike,
    Client,
    DeadlineExceeded,
    ResourceExhausted,
    Unavailable,
    _backoff_delay,
)

__all__ = ["EmbedBatches", "extract_to_parquet"]

_TRANSIENT = (Unavailable, ResourceExhausted, DeadlineExceeded)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class EmbedBatches:
    """Callable class for ``Dataset.map_batches``: image paths or bytes -> embedding columns.

    `servers`: one ``host:port`` or a list (e.g. replicas, or one load balancer); each actor
    starts on a different one and moves to the next when a call still fails with
    UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED after the client's own retries,
    up to `retries` times per batch with backoff. `column`: the input column, "path"
    (file paths, read by the worker) or "bytes" (encoded images, e.g. from
    ``read_binary_files``). Other columns are passed through; `drop_input` drops the
    input column (bytes are large). `flip`, `alignment`, `token`, `timeout` as for Client.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        column: str = "path",
        flip: bool = False,
        alignment: AlignmentLike = None,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 120.0,
        token: str | None = None,
        drop_input: bool = False,
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        if not self.servers:
            raise ValueError("servers: need at least one host:port")
        self.column = column
        self.flip = flip
        self.alignment = alignment
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.token = token
        self.drop_input = drop_input
        # Actors are separate processes: spread them over the servers by pid.
        self._turn = os.getpid() % len(self.servers)
        self._client: Client | None = None

    def _connect(self) -> Client:
        if self._client is None:
            target = self.servers[self._turn % len(self.servers)]
            self._client = Client(target, timeout=self.timeout, flip=self.flip, token=self.token)
        return self._client

    def _next_server(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None
        self._turn += 1

    def _embed(self, images: list[Any]) -> list[Any]:
        for attempt in itertools.count():
            try:
                return self._connect().embed_results(images, alignment=self.alignment)
            except _TRANSIENT:
                if attempt >= self.retries:
                    raise
                self._next_server()
                time.sleep(_backoff_delay(self.backoff, attempt))
        raise AssertionError("unreachable")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.column not in batch:
            raise KeyError(f"column {self.column!r} not in batch (columns: {sorted(batch)})")
        images = [x.item() if isinstance(x, np.generic) else x for x in batch[self.column]]
        images = [bytes(x) if isinstance(x, bytes | bytearray | memoryview) else x for x in images]
        n = len(images)
        try:
            results = self._embed(images) if n else []
        except AdafaceError:
            # A request fails whole only when every image of it failed: name each one.
            results = []
            for image in images:
                try:
                    results.extend(self._embed([image]))
                except AdafaceError as e:
                    if isinstance(e, _TRANSIENT):
                        raise
                    results.append(e)
        dim = next((r.embedding.size for r in results if getattr(r, "ok", False)), 0)
        dim = dim or self._connect().info().embedding_dim
        embedding = np.full((n, dim), np.nan, dtype=np.float32)
        norm = np.full(n, np.nan, dtype=np.float32)
        error = np.full(n, "", dtype=object)
        for i, r in enumerate(results):
            if isinstance(r, AdafaceError):
                error[i] = f"{r.code.name}: {r.details}"
            elif r.ok:
                embedding[i] = r.embedding
                norm[i] = r.norm
            else:
                error[i] = f"{r.reason or 'UNSPECIFIED'}: {r.message}"
        out = {k: v for k, v in batch.items() if not (self.drop_input and k == self.column)}
        out.update(embedding=embedding, norm=norm, error=error)
        return out


def extract_to_parquet(
    source: str | os.PathLike,
    output: str | os.PathLike,
    servers: str | Sequence[str],
    *,
    path_column: str = "path",
    concurrency: int = 2,
    batch_size: int = 64,
    num_cpus: float = 0.25,
    flip: bool = False,
    alignment: AlignmentLike = None,
    token: str | None = None,
) -> None:
    """Embeds every image of `source` on the running Ray cluster and writes Parquet to `output`.

    `source`: a folder (every image below it, by suffix, in sorted order; column ``path``
    is the path relative to the folder, images are read by Ray tasks) or a manifest: a .csv
    or .parquet file with a `path_column` (read by the workers, so paths must be visible
    to every node) and any other columns (ids, labels), kept. Rows keep the source's
    order. Adds ``embedding``, ``norm`` and ``error`` as EmbedBatches does. Call
    ``ray.init(address=...)`` first to use a cluster (otherwise Ray starts a local one).
    `num_cpus` per actor is small because actors mostly wait on the servers; a whole CPU
    each would leave none for Ray's read and write tasks on a small node (a deadlock).
    """
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    src = Path(source)
    kwargs: dict[str, Any] = {"servers": servers, "flip": flip, "alignment": alignment}
    kwargs["token"] = token
    if src.is_dir():
        files = sorted(
            str(p) for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)})")
        root = src.resolve()
        # The sorted list is the order: Ray's read_binary_files may reorder the files of a
        # folder between its read tasks (18.jpg and 19.jpg came before 10.jpg once), so
        # Ray tasks read the listed files themselves, in blocks that keep the list's order.
        relative = [os.path.relpath(os.path.abspath(p), root) for p in files]
        ds = ray.data.from_items([{"path": p} for p in relative])

        def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            data = np.empty(len(batch["path"]), dtype=object)
            data[:] = [(root / p).read_bytes() for p in batch["path"]]
            return {"path": batch["path"], "bytes": data}

        ds = ds.map_batches(read, batch_format="numpy")
        kwargs.update(column="bytes", drop_input=True)
    elif src.suffix.lower() == ".csv":
        ds = ray.data.read_csv(str(src))
        kwargs.update(column=path_column)
    elif src.suffix.lower() == ".parquet":
        ds = ray.data.read_parquet(str(src))
        kwargs.update(column=path_column)
    else:
        raise ValueError(f"{src}: expected a folder, a .csv or a .parquet manifest")
    ds = ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs=kwargs,
        concurrency=concurrency,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
    ds.write_parquet(str(output))
