"""Bulk feature extraction into memory or a resumable memmap, and sharded across ranks.

A replacement for the seed's ``all_gather(outputs)`` in distributed validation: each rank
writes its rows straight into one shared ``.npy`` memmap and drops a done marker; any rank's
``gather()`` then reads the whole [N, D] array. No torch.distributed, nothing pickled.

Files next to ``out`` (a path ending in ``.npy``):

- ``out``: features [N, D] float32 (``np.load(out, mmap_mode="r")``), NaN rows until done;
- ``out.norms.npy``: norms [N, 1] float32 (AdaFace's quality signal);
- ``out.rows.npy``: uint8 [N], 1 where the row is written (a rerun skips those), 2 where
  the image failed and ``on_error="nan"`` left it NaN;
- ``out.shard-R-of-W.done``: JSON marker, written atomically once rank R finished;
- ``out.manifest.json`` and ``out.inputs.npy``: what the file holds (the ordered inputs'
  identity, the model checksum, alignment and options; see adaface_client.manifest),
  written before any row. A run whose manifest differs is refused (ManifestMismatch), or
  starts over with ``overwrite=True``; every rank checks it, and ``gather`` refuses done
  markers written for another manifest;
- ``out.lock``: serialises the manifest check between ranks (flock).

A row is marked only after its features are flushed, so a crash at any point loses at most
the rows in flight. The files must live on a filesystem every rank can memory-map (a local
disk shared by the processes of one machine, or a POSIX-coherent shared filesystem).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from adaface_client.cli import Progress
from adaface_client.client import (
    AlignmentLike,
    Client,
    DeadlineExceeded,
    ImageLike,
    LandmarksLike,
    ResourceExhausted,
    Unavailable,
    _backoff_delay,
)
from adaface_client.manifest import (
    ManifestMismatch,
    build_manifest,
    compare_manifest,
    row_fingerprints,
)

__all__ = ["ExtractionError", "Extractor", "GatherTimeout", "ManifestMismatch", "shard_env"]

PENDING, DONE, FAILED = 0, 1, 2
_TRANSIENT = (Unavailable, ResourceExhausted, DeadlineExceeded)


class ExtractionError(Exception):
    """Some images produced no embedding; `errors` lists (row, reason, message). Every other
    row was written, so a rerun only retries these."""

    def __init__(self, errors: list[tuple[int, str, str]]) -> None:
        self.errors = errors
        shown = "; ".join(f"[{i}] {reason}: {msg}" for i, reason, msg in errors[:5])
        more = f"; ... {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} images failed: {shown}{more}")


class GatherTimeout(TimeoutError):
    """Some ranks did not mark their shard done in time; `missing` lists them."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


def shard_env(
    rank: int | None = None, world_size: int | None = None, env: dict[str, str] | None = None
) -> tuple[int, int]:
    """(rank, world_size): the arguments, else $RANK / $WORLD_SIZE (torchrun's), else
    $LOCAL_RANK for the rank, else (0, 1)."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def _companions(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".norms.npy"), out.with_name(out.name + ".rows.npy")


def _marker(out: Path, rank: int, world_size: int) -> Path:
    return out.with_name(f"{out.name}.shard-{rank}-of-{world_size}.done")


def _manifest_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".manifest.json"), out.with_name(out.name + ".inputs.npy")


def _manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive flock on ``out.lock``: one process checks or resets the files at a time."""
    with open(out.with_name(out.name + ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _discard(out: Path) -> None:
    for path in (out, *_companions(out), *_manifest_paths(out)):
        path.unlink(missing_ok=True)
    for marker in out.parent.glob(f"{out.name}.shard-*-of-*.done"):
        marker.unlink(missing_ok=True)


def _claim(out: Path, manifest: dict[str, Any], rows: np.ndarray, overwrite: bool) -> None:
    """Makes `out`'s manifest `manifest`: checks an existing one (refusing a mismatch unless
    `overwrite`, which discards the old files), or writes it before any data file exists."""
    manifest_path, inputs_path = _manifest_paths(out)
    if manifest_path.exists():
        stored = np.load(inputs_path) if inputs_path.exists() else None
        try:
            compare_manifest(manifest_path, manifest, rows, stored)
            return
        except ManifestMismatch:
            if not overwrite:
                raise
        _discard(out)
    elif any(p.exists() for p in (out, *_companions(out))):
        if not overwrite:
            raise ManifestMismatch(
                f"{out} exists without a manifest ({manifest_path.name}), so what its rows "
                "hold is unknown: pass overwrite=True to discard them, or write to another file"
            )
        _discard(out)
    tmp = inputs_path.with_name(f".{inputs_path.name}.{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, rows.astype("<u8"))
    os.replace(tmp, inputs_path)
    # The manifest goes last: once it exists, the inputs file beside it is complete.
    _write_atomic(manifest_path, json.dumps(manifest, indent=1))


def _open_or_create(path: Path, shape: tuple[int, ...], dtype: str, fill: float) -> np.memmap:
    """Opens the .npy memmap at `path`, creating it atomically when absent: concurrent ranks
    race to link a complete file into place and all end up sharing the winner's."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fresh = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            if fill:
                fresh[...] = fill
            fresh.flush()
            del fresh
            # Another rank won the race: use its (identical, still empty) file.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    array = np.load(path, mmap_mode="r+")
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise ValueError(
            f"{path} holds {array.dtype}{list(array.shape)}, expected {np.dtype(dtype)}"
            f"{list(shape)}: delete it (and its .norms/.rows/.done companions) to start over"
        )
    return array


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Extractor:
    """Features for any sequence of images, in dataset order, through an Embedder server.

    Images are sent in chunks of `chunk_size` (default: enough to keep the client's
    `max_in_flight` requests busy), `prefetch` chunks at a time, so at most
    ``prefetch * max_in_flight`` requests are outstanding. The client retries UNAVAILABLE /
    RESOURCE_EXHAUSTED per request; a chunk that still fails that way (a server restart, a
    timeout) is retried whole up to `retries` more times. `progress`: True for a stderr
    progress bar, False for none, or a callable given the rows committed each time.
    `credentials` and `token` (TLS and a bearer token, as for Client) apply when `target`
    is an address; a ready Client is used as it is.
    """

    def __init__(
        self,
        target: str | Client,
        *,
        flip: bool = False,
        chunk_size: int | None = None,
        prefetch: int = 2,
        max_in_flight: int = 4,
        retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 60.0,
        progress: bool | Callable[[int], object] = True,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._own_client = not isinstance(target, Client)
        self.client = (
            Client(
                target,
                max_in_flight=max_in_flight,
                timeout=timeout,
                flip=flip,
                credentials=credentials,
                token=token,
            )
            if isinstance(target, str)
            else target
        )
        self.flip = flip
        self.chunk_size = chunk_size
        self.prefetch = prefetch
        self.retries = retries
        self.backoff = backoff
        self.progress = progress

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    # -- public API ------------------------------------------------------------------------

    def extract(
        self,
        images: Sequence[ImageLike],
        out: str | os.PathLike | None = None,
        *,
        landmarks: Sequence[LandmarksLike] | None = None,
        alignment: AlignmentLike = None,
        with_norms: bool = False,
        on_error: str = "raise",
        sharded: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        overwrite: bool = False,
    ) -> Any:
        """Embeds `images` (paths, encoded bytes, PIL images, HxWx3 uint8 arrays).

        Images are photos (the server detects the best face) unless `landmarks` are given or
        `alignment="aligned"` says they are 112x112 crops.

        Without `out`: returns features [N, D] float32 (and norms [N, 1] with `with_norms`).
        With `out` (a .npy path): writes into the memmap there, skipping rows an earlier
        run finished, and returns it. Sharded (`sharded=True` with rank and world size from
        $RANK/$WORLD_SIZE/$LOCAL_RANK, or `rank`/`world_size` given): this rank embeds only
        its rows (`indices`, by default the
        rank's contiguous 1/world_size of the dataset) into the shared memmap, marks its
        shard done and returns the memmap; call `gather(out)` for the whole array.

        `on_error`: "raise" (ExtractionError after writing every other row) or "nan"
        (failed rows stay NaN and count as done).

        With `out`, the file's manifest (inputs, model, options) must match this run, else
        ManifestMismatch names what differs; `overwrite=True` discards the old rows instead.
        Every rank of a sharded run checks it.
        """
        if on_error not in ("raise", "nan"):
            raise ValueError(f"on_error must be 'raise' or 'nan', got {on_error!r}")
        if landmarks is not None and len(landmarks) != len(images):
            raise ValueError(f"{len(landmarks)} landmarks for {len(images)} images")
        n = len(images)
        info = self.client.info()
        dim = info.embedding_dim
        sharded = sharded or rank is not None or world_size is not None or indices is not None
        if sharded:
            if out is None:
                raise ValueError("sharded extraction writes into a shared file: pass out=")
            rank, world_size = shard_env(rank, world_size)
            if indices is None:
                indices = np.array_split(np.arange(n), world_size)[rank]
        rows_wanted = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
        if rows_wanted.size and not (rows_wanted.min() >= 0 and rows_wanted.max() < n):
            raise ValueError(f"indices must be in 0..{n - 1}")

        if out is None:
            features = np.full((n, dim), np.nan, dtype=np.float32)
            norms = np.full((n, 1), np.nan, dtype=np.float32)
            state = np.zeros(n, dtype=np.uint8)
        else:
            out = Path(out)
            norms_path, rows_path = _companions(out)
            fingerprints = row_fingerprints(images)
            manifest = build_manifest(
                fingerprints,
                dim=dim,
                model=info.model_name,
                model_checksum=info.model_checksum,
                alignment=alignment,
                landmarks=landmarks,
                flip=self.flip,
            )
            with _locked(out):
                _claim(out, manifest, fingerprints, overwrite)
                features = _open_or_create(out, (n, dim), "<f4", np.nan)
                norms = _open_or_create(norms_path, (n, 1), "<f4", np.nan)
                state = _open_or_create(rows_path, (n,), "u1", 0)
        todo = rows_wanted[state[rows_wanted] != DONE]
        errors = self._run(images, todo, landmarks, alignment, features, norms, state, on_error)
        if isinstance(features, np.memmap):
            state.flush()
        if errors:
            raise ExtractionError(errors)
        if sharded:
            assert out is not None and rank is not None and world_size is not None
            marker = {
                "rank": rank,
                "world_size": world_size,
                "rows": int(rows_wanted.size),
                "n": n,
                "dim": dim,
                "manifest": _manifest_digest(manifest),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "time": time.time(),
            }
            _write_atomic(_marker(Path(out), rank, world_size), json.dumps(marker))
        return (features, norms) if with_norms else features

    def gather(
        self,
        out: str | os.PathLike,
        *,
        world_size: int | None = None,
        timeout: float = 3600.0,
        poll: float = 0.5,
        with_norms: bool = False,
    ) -> Any:
        """Waits until every rank's shard of `out` is done, then returns the full features
        [N, D] in dataset order (a read-only memmap). Raises GatherTimeout naming the ranks
        still missing after `timeout` seconds."""
        return gather(out, world_size=world_size, timeout=timeout, poll=poll, with_norms=with_norms)

    # -- internals -------------------------------------------------------------------------

    def _chunk_rows(self) -> int:
        if self.chunk_size:
            return self.chunk_size
        info = self.client.info()
        return max(1, info.max_images_per_request) * self.client.max_in_flight

    def _run(
        self,
        images: Sequence[ImageLike],
        todo: np.ndarray,
        landmarks: Sequence[LandmarksLike] | None,
        alignment: AlignmentLike,
        features: np.ndarray,
        norms: np.ndarray,
        state: np.ndarray,
        on_error: str,
    ) -> list[tuple[int, str, str]]:
        step = self._chunk_rows()
        chunks = [todo[i : i + step] for i in range(0, todo.size, step)]
        bar = None
        report: Callable[[int], object] | None = None
        if callable(self.progress):
            report = self.progress
        elif self.progress:
            bar = Progress(todo.size, sys.stderr, enabled=True)
            report = bar.update
        errors: list[tuple[int, str, str]] = []
        memmapped = isinstance(features, np.memmap)

        def embed(rows: np.ndarray) -> tuple[np.ndarray, list]:
            for attempt in range(self.retries + 1):
                try:
                    return rows, self.client.embed_results(
                        [images[i] for i in rows],
                        landmarks=None if landmarks is None else [landmarks[i] for i in rows],
                        alignment=alignment,
                        flip=self.flip,
                    )
                except _TRANSIENT:
                    if attempt == self.retries:
                        raise
                    time.sleep(_backoff_delay(self.backoff, attempt))
            raise AssertionError("unreachable")

        pool = concurrent.futures.ThreadPoolExecutor(self.prefetch, thread_name_prefix="extract")
        try:
            pending: set[concurrent.futures.Future] = set()
            queue = iter(chunks)
            while True:
                while len(pending) < self.prefetch:
                    rows = next(queue, None)
                    if rows is None:
                        break
                    pending.add(pool.submit(embed, rows))
                if not pending:
                    break
                finished, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    rows, results = future.result()
                    ok = np.array([r.ok for r in results], dtype=bool)
                    for row, r in zip(rows, results, strict=True):
                        if r.ok:
                            features[row] = r.embedding
                            norms[row, 0] = r.norm
                        else:
                            errors.append((int(row), r.reason or "UNSPECIFIED", r.message))
                    if memmapped:
                        # Rows are marked only once their values are on disk.
                        features.flush()  # type: ignore[union-attr]
                        norms.flush()  # type: ignore[union-attr]
                    state[rows[ok]] = DONE
                    if on_error == "nan":
                        state[rows[~ok]] = FAILED
                    if report is not None:
                        report(len(rows))
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
        return [] if on_error == "nan" else sorted(errors)


def gather(
    out: str | os.PathLike,
    *,
    world_size: int | None = None,
    timeout: float = 3600.0,
    poll: float = 0.5,
    with_norms: bool = False,
) -> Any:
    """Module-level `Extractor.gather`: needs no server connection."""
    out = Path(out)
    if world_size is None:
        _, world_size = shard_env(0, None)
    deadline = time.monotonic() + timeout
    while True:
        missing = [r for r in range(world_size) if not _marker(out, r, world_size).exists()]
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise GatherTimeout(
                f"gather {out}: ranks {missing} of world_size {world_size} did not mark their "
                f"shard done within {timeout:g}s (no {_marker(out, missing[0], world_size).name})",
                missing,
            )
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
    markers = [json.loads(_marker(out, r, world_size).read_text()) for r in range(world_size)]
    features = np.load(out, mmap_mode="r")
    sizes = {m["n"] for m in markers}
    if sizes != {features.shape[0]}:
        raise ValueError(
            f"gather {out}: shard markers describe datasets of {sorted(sizes)} rows but the "
            f"file holds {features.shape[0]}: stale markers from another run?"
        )
    manifest_path, _ = _manifest_paths(out)
    if manifest_path.exists():
        digest = _manifest_digest(json.loads(manifest_path.read_text()))
        stale = [r for r, m in enumerate(markers) if m.get("manifest") != digest]
        if stale:
            raise ValueError(
                f"gather {out}: the done markers of ranks {stale} were written for another "
                f"extraction than {manifest_path.name} describes: rerun those ranks"
            )
    norms_path, rows_path = _companions(out)
    state = np.load(rows_path, mmap_mode="r")
    pending = np.flatnonzero(state == PENDING)
    if pending.size:
        raise ValueError(
            f"gather {out}: every shard is marked done but {pending.size} rows were never "
            f"written (first: {pending[:5].tolist()}); do the ranks' indices cover 0..N-1?"
        )
    if with_norms:
        return features, np.load(norms_path, mmap_mode="r")
    return features
