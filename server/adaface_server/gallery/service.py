"""The gallery service: named galleries of identities, 1:N search, 1:1 verify, import/export."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import Settings
from ..embedding import EmbeddingService
from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from ..preprocess.detect import DetectParams
from ..stopping import until_stopped
from . import changelog
from . import store as db
from .changelog import Follower, LiveGallery, Replica
from .index import Change, ExactIndex, Stopped, create_index
from .records import (
    EnrollResult,
    GalleryView,
    ProbeOutcome,
    SampleInput,
    SampleOutcome,
    VerifyOperand,
    VerifyResult,
)
from .store import GalleryRow, IdentityRow, SampleRow
from .stores import open_store
from .transfer import export_stream, group_export, insert_imported, parse_native, parse_seed_pth
from .validation import (
    DEFAULT_DIM,
    DEFAULT_PAGE_SIZE,
    DEFAULT_TOP_K,
    FORMATS,
    MAX_PAGE_SIZE,
    MAX_PROBES,
    MAX_SAMPLE_ID,
    MAX_TOP_K,
    MODES,
    SCORINGS,
    check_identity,
    check_import,
    check_metadata,
    check_name,
    check_vector,
    decode_page_token,
    encode_page_token,
    shown,
)

log = logging.getLogger(__name__)


class GalleryService:
    """Owns the store, this process's replica of every gallery, and the read/search threads.

    Other processes may write the same store: every call first catches up with the change
    log (read-your-writes across processes), and a follower thread keeps up while idle.
    """

    def __init__(self, settings: Settings, embedding: EmbeddingService) -> None:
        self.settings = settings
        self.embedding = embedding
        self.store = open_store(settings)
        self._replica = Replica(self.store, lambda dim, n: self._new_index(dim, n))
        self._follower = Follower(self._replica, settings.gallery_log_keep)
        self._reads = ThreadPoolExecutor(
            max_workers=settings.gallery_search_workers, thread_name_prefix="gallery-read"
        )
        self._ready = False
        self._open_error: ServiceError | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Opens the store and rebuilds every index; failures are logged and reported by
        every gallery call (the embedding service keeps working)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._open)
        except ServiceError as exc:
            self._open_error = exc
            log.error("gallery store unavailable: %s", exc)
        except Exception as exc:
            self._open_error = Internal(f"gallery store {self.store.path} failed to open: {exc}")
            log.exception("opening the gallery store failed")

    @property
    def _galleries(self) -> dict[str, LiveGallery]:
        return self._replica.galleries

    def _open(self) -> None:
        started = time.perf_counter()
        self.store.open()
        self._replica.load()
        self._follower.start()
        self._ready = True
        log.info(
            "gallery store %s: %d galleries, %d samples indexed in %.2fs, searched on %s",
            self.store.path,
            len(self._galleries),
            sum(g.samples for g in self._galleries.values()),
            time.perf_counter() - started,
            self.settings.gallery_device,
        )

    def _new_index(self, dim: int, capacity: int = 0) -> ExactIndex:
        s = self.settings
        return create_index(
            s.gallery_index,
            dim,
            s.gallery_dtype,
            s.gallery_search_chunk_mb << 20,
            s.gallery_compact_ratio,
            capacity=max(capacity, 1024),
            hnsw_m=s.gallery_hnsw_m,
            hnsw_ef_search=s.gallery_hnsw_ef_search,
            device=None if s.gallery_device == "cpu" else s.gallery_device,
        )

    async def close(self) -> None:
        was_ready, self._ready = self._ready, False
        loop = asyncio.get_running_loop()
        if was_ready:
            await loop.run_in_executor(None, self._follower.stop)
        await loop.run_in_executor(None, self.store.close)
        self._reads.shutdown(wait=False, cancel_futures=True)

    def sizes(self) -> list[tuple[str, int, int]]:
        """(gallery, identities, samples) for each gallery; safe to call from any thread."""
        return [(name, g.identities, g.samples) for name, g in list(self._galleries.items())]

    def memory(self) -> list[tuple[str, int, int]]:
        """(gallery, host bytes, search-device bytes) of each gallery's index; safe to call
        from any thread."""
        return [
            (name, g.index.stats().nbytes, g.index.device_bytes())
            for name, g in list(self._galleries.items())
        ]

    # -- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._open_error is not None:
            raise self._open_error
        if not self._ready:
            raise Unavailable(f"gallery store {self.store.path} is loading")

    async def _sync(self) -> None:
        """Read-your-writes: brings this process up to every write the store acknowledged."""
        self._check_open()
        await self._read(self._replica.sync)

    async def _synced(self, name: str) -> LiveGallery:
        await self._sync()
        return self._gallery(name)

    def _logged(self, conn: Any, gallery_id: int, kind: str, payload: dict | None, apply):
        """Appends the write's change-log entry; returns the after-commit step that brings
        this process's memory up to it."""
        seq = changelog.append(conn, gallery_id, kind, payload)
        return lambda: self._replica.committed(seq, apply)

    def _gallery(self, name: str) -> LiveGallery:
        self._check_open()
        g = self._galleries.get(name)
        if g is None:
            raise NotFound(f"gallery {shown(name)} not found")
        return g

    async def _write(self, op: db.Op):
        return await asyncio.wrap_future(self.store.submit(op))

    async def _read(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, *args)

    async def _read_until_stopped(self, fn, *args):
        """`fn(*args, should_stop=...)` in the read pool, stopped when the caller is gone
        (stopping.until_stopped); a search or import told to stop says where it stopped."""

        def stopped(error: BaseException) -> None:
            if isinstance(error, Stopped):
                log.info("%s", error)

        return await until_stopped(
            self._reads, lambda should_stop: fn(*args, should_stop=should_stop), None, stopped
        )

    def _served(self) -> tuple[str, str]:
        info = self.embedding.info()  # UNAVAILABLE while the model loads
        return info.model_checksum, info.model_name

    def _check_pin(self, g: GalleryRow, images: bool, vectors: bool, declared: str) -> None:
        """Images are embedded by the served model; vectors come from `declared` (or it)."""
        if not (images or vectors):
            return
        pinned = f"{g.model_checksum} ({g.model_name or 'name unknown'})"
        if images or not declared:
            served, served_name = self._served()
            if served != g.model_checksum:
                raise FailedPrecondition(
                    f"gallery {shown(g.name)} is pinned to model {pinned}, but this server serves "
                    f"model {served} ({served_name}); serve the gallery's model or use a "
                    "gallery built with this one"
                )
        if vectors and declared and declared != g.model_checksum:
            raise FailedPrecondition(
                f"gallery {shown(g.name)} is pinned to model {pinned}, but the vectors come from "
                f"model {declared} (model_checksum)"
            )

    async def _outcomes(
        self,
        inputs: Sequence[SampleInput],
        field_name: str,
        dim: int,
        flip: bool,
        detect: DetectParams | None = None,
    ) -> list[SampleOutcome]:
        """Embeds the images, validates the vectors; per-image failures become outcomes."""
        out: list[SampleOutcome | None] = [None] * len(inputs)
        for i, s in enumerate(inputs):
            if s.vector is not None:
                unit = check_vector(s.vector, s.dim, dim, f"{field_name}[{i}].vector")
                out[i] = SampleOutcome(vector=unit, norm=s.norm)
        images = [i for i, s in enumerate(inputs) if s.image is not None]
        if images:
            limit = self.settings.max_images_per_request
            if len(images) > limit:
                raise InvalidArgument(
                    f"{field_name}: at most {limit} images per request "
                    f"(max_images_per_request), got {len(images)}"
                )
            items = [inputs[i].image for i in images]
            results = await self.embedding.embed(items, flip=flip, detect=detect)  # type: ignore[arg-type]
            for j, (i, r) in enumerate(zip(images, results, strict=True)):
                if r.ok:
                    vec = np.asarray(r.embedding, np.float32)
                    if vec.size != dim:
                        raise FailedPrecondition(
                            f"{field_name}[{i}]: the model gives {vec.size}-d embeddings, "
                            f"the gallery holds {dim}-d vectors"
                        )
                    out[i] = SampleOutcome(vector=vec, norm=r.norm)
                else:
                    message = r.error_message
                    # The embedder counts images within its own call; name the caller's field.
                    prefix = f"images[{j}]"
                    if message.startswith(prefix):
                        message = message[len(prefix) :]
                    out[i] = SampleOutcome(
                        error_reason=r.error_reason,
                        error_message=f"{field_name}[{i}]{message}",
                    )
        return out  # type: ignore[return-value]

    # -- galleries -----------------------------------------------------------------------

    async def create(
        self, name: str, model_checksum: str, dim: int, metadata: dict[str, str]
    ) -> GalleryView:
        self._check_open()
        check_name(name, "name")
        check_metadata(metadata, "metadata")
        model_name = ""
        if not model_checksum:
            model_checksum, model_name = self._served()
            model_dim = self.embedding.info().embedding_dim
            if dim and dim != model_dim:
                raise InvalidArgument(f"dim: the served model gives {model_dim}, got {dim}")
            dim = model_dim
        elif not re.fullmatch(r"[0-9a-f]{64}", model_checksum):
            raise InvalidArgument(
                "model_checksum: need 64 lowercase hex digits (sha256), got "
                f"{shown(model_checksum)}"
            )
        dim = dim or DEFAULT_DIM
        if not 1 <= dim <= 65536:
            raise InvalidArgument(f"dim: must be 1..65536, got {dim}")
        await self._sync()
        if name in self._galleries:
            raise AlreadyExists(f"gallery {shown(name)} already exists")
        index = self._new_index(dim)

        def op(conn):
            if db.gallery_id_of(conn, name) is not None:
                raise AlreadyExists(f"gallery {shown(name)} already exists")
            row = db.insert_gallery(conn, name, model_checksum, model_name, dim, metadata)
            g = LiveGallery(row, index, 0, 0)

            def apply() -> None:
                self._galleries[name] = g

            return g, self._logged(conn, row.gallery_id, changelog.CREATE, None, apply)

        g = await self._write(op)
        return g.view()

    async def get(self, name: str) -> GalleryView:
        return (await self._synced(name)).view()

    async def list(self) -> list[GalleryView]:
        await self._sync()
        return [g.view() for _, g in sorted(self._galleries.items())]

    async def delete(self, name: str) -> tuple[int, int]:
        g = await self._synced(name)

        def op(conn):
            if not db.gallery_exists(conn, g.row.gallery_id):
                raise NotFound(f"gallery {shown(name)} not found")
            counts = db.delete_gallery(conn, g.row.gallery_id)

            def apply() -> None:
                if self._galleries.get(name) is g:
                    del self._galleries[name]

            return counts, self._logged(conn, g.row.gallery_id, changelog.DROP, None, apply)

        return await self._write(op)

    # -- identities ----------------------------------------------------------------------

    async def enroll(
        self,
        gallery: str,
        identity: str,
        metadata: dict[str, str],
        samples: Sequence[SampleInput],
        mode: str = "create",
        flip: bool = False,
        detect: DetectParams | None = None,
        model_checksum: str = "",
    ) -> EnrollResult:
        g = await self._synced(gallery)
        check_identity(identity, "identity")
        check_metadata(metadata, "metadata")
        if mode not in MODES:
            raise InvalidArgument(f"mode: must be one of {', '.join(MODES)}, got {mode!r}")
        if not samples:
            raise InvalidArgument("samples: at least one sample is required")
        if len(samples) > self.settings.max_images_per_request:
            raise InvalidArgument(
                f"samples: at most {self.settings.max_images_per_request} per request "
                f"(max_images_per_request), got {len(samples)}"
            )
        has_images = any(s.image is not None for s in samples)
        has_vectors = any(s.vector is not None for s in samples)
        self._check_pin(g.row, has_images, has_vectors, model_checksum)
        outcomes = await self._outcomes(samples, "samples", g.row.dim, flip, detect)
        good = [i for i, o in enumerate(outcomes) if o.ok]
        if not good:
            raise InvalidArgument(
                f"identity {shown(identity)}: no sample could be enrolled: "
                + "; ".join(o.error_message for o in outcomes[:5])
            )
        vectors = np.stack([outcomes[i].vector for i in good]).astype(np.float32)
        norms = np.asarray([outcomes[i].norm for i in good], np.float32)
        gid = g.row.gallery_id

        def op(conn):
            if not db.gallery_exists(conn, gid):
                raise NotFound(f"gallery {shown(gallery)} not found")
            existing = db.find_identity(conn, gid, identity)
            if existing is not None and mode == "create":
                raise AlreadyExists(
                    f"identity {shown(identity)} already exists in gallery {shown(gallery)}"
                )
            if existing is None and mode == "append":
                raise NotFound(f"identity {shown(identity)} not found in gallery {shown(gallery)}")
            if existing is None:
                identity_id, before = db.insert_identity(conn, gid, identity, metadata), 0
            else:
                identity_id, before = existing.identity_id, existing.sample_count
                if metadata:
                    db.set_identity_metadata(conn, identity_id, metadata)
            ids = db.insert_samples(conn, gid, identity_id, vectors, norms)
            change = Change(
                add_keys=ids,
                add_labels=np.full(len(ids), identity_id, np.int64),
                add_vectors=vectors,
                names={identity_id: identity},
                identity_delta=1 if before == 0 else 0,
            )

            entry = changelog.sample_change(
                ids, identity_id, identity, int(existing is None), change.identity_delta
            )

            def apply() -> None:
                g.index.apply([change])
                g.identities += existing is None
                g.samples += len(ids)

            after = self._logged(conn, gid, changelog.ADD, entry, apply)
            return (existing is None, ids, before + len(ids)), after

        created, ids, count = await self._write(op)
        for i, sid in zip(good, ids.tolist(), strict=True):
            outcomes[i] = SampleOutcome(sample_id=sid, norm=outcomes[i].norm)
        return EnrollResult(identity, created, outcomes, count)

    async def remove_samples(self, gallery: str, sample_ids: Sequence[int]) -> tuple[int, int]:
        g = await self._synced(gallery)
        if not sample_ids:
            raise InvalidArgument("sample_ids: at least one id is required")
        wanted = list(dict.fromkeys(int(s) for s in sample_ids))
        # Ids are SQLite rowids (signed 64-bit): a larger uint64 cannot name a sample, and
        # binding it would raise OverflowError inside the writer.
        beyond = [s for s in wanted if s > MAX_SAMPLE_ID]
        if beyond:
            raise NotFound(f"sample {beyond[0]} not found in gallery {shown(gallery)}")

        def op(conn):
            owners = db.sample_owners(conn, g.row.gallery_id, wanted)
            missing = [s for s in wanted if s not in owners]
            if missing:
                raise NotFound(f"sample {missing[0]} not found in gallery {shown(gallery)}")
            emptied = db.delete_samples(conn, owners)
            change = Change(remove_keys=np.asarray(wanted, np.int64), identity_delta=-len(emptied))

            def apply() -> None:
                g.index.apply([change])
                g.samples -= len(wanted)

            entry = changelog.removal(wanted, 0, change.identity_delta)
            return (0, len(wanted)), self._logged(
                conn, g.row.gallery_id, changelog.REMOVE, entry, apply
            )

        return await self._write(op)

    async def remove_identity(self, gallery: str, identity: str) -> tuple[int, int]:
        g = await self._synced(gallery)

        def op(conn):
            found = db.find_identity(conn, g.row.gallery_id, identity)
            if found is None:
                raise NotFound(f"identity {shown(identity)} not found in gallery {shown(gallery)}")
            ids = db.delete_identity(conn, found.identity_id)
            change = Change(
                remove_keys=np.asarray(ids, np.int64),
                identity_delta=-1 if found.sample_count else 0,
            )

            def apply() -> None:
                g.index.apply([change])
                g.identities -= 1
                g.samples -= len(ids)

            entry = changelog.removal(ids, -1, change.identity_delta)
            return (1, len(ids)), self._logged(
                conn, g.row.gallery_id, changelog.REMOVE, entry, apply
            )

        return await self._write(op)

    async def get_identity(
        self, gallery: str, identity: str, include_vectors: bool
    ) -> tuple[IdentityRow, list[SampleRow]]:
        g = await self._synced(gallery)

        def read():
            with self.store.snapshot() as conn:
                found = db.find_identity(conn, g.row.gallery_id, identity)
                if found is None:
                    raise NotFound(
                        f"identity {shown(identity)} not found in gallery {shown(gallery)}"
                    )
                return found, db.identity_samples(
                    conn, found.identity_id, g.row.dim, with_vectors=include_vectors
                )

        return await self._read(read)

    async def list_identities(
        self, gallery: str, page_size: int, page_token: str
    ) -> tuple[list[IdentityRow], str]:
        g = await self._synced(gallery)
        size = page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size: must be 0..{MAX_PAGE_SIZE}, got {page_size}")
        after = decode_page_token(page_token)

        def read():
            with self.store.snapshot() as conn:
                return db.list_identities(conn, g.row.gallery_id, after, size + 1)

        rows = await self._read(read)
        token = encode_page_token(rows[size - 1].name) if len(rows) > size else ""
        return rows[:size], token

    # -- search and verify ---------------------------------------------------------------

    async def search(
        self,
        gallery: str,
        probes: Sequence[SampleInput],
        top_k: int = 0,
        min_score: float | None = None,
        scoring: str = "max",
        flip: bool = False,
        detect: DetectParams | None = None,
        model_checksum: str = "",
    ) -> tuple[list[ProbeOutcome], int]:
        g = await self._synced(gallery)
        if not probes:
            raise InvalidArgument("probes: at least one probe is required")
        if len(probes) > MAX_PROBES:
            raise InvalidArgument(f"probes: at most {MAX_PROBES} per request, got {len(probes)}")
        k = top_k or DEFAULT_TOP_K
        if not 1 <= k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k: must be 0..{MAX_TOP_K}, got {top_k}")
        if min_score is not None and not -1.0 <= min_score <= 1.0:
            raise InvalidArgument(f"min_score: must be in [-1, 1], got {min_score}")
        if scoring not in SCORINGS:
            raise InvalidArgument(f"scoring: must be max or mean, got {scoring!r}")
        self._check_pin(
            g.row,
            any(p.image is not None for p in probes),
            any(p.vector is not None for p in probes),
            model_checksum,
        )
        outcomes = await self._outcomes(probes, "probes", g.row.dim, flip, detect)
        good = [i for i, o in enumerate(outcomes) if o.ok]
        results = [
            ProbeOutcome(error_reason=o.error_reason, error_message=o.error_message)
            for o in outcomes
        ]
        searched = g.index.snapshot.identities
        if good:
            matrix = np.stack([outcomes[i].vector for i in good])
            hits, searched = await self._read_until_stopped(
                g.index.search, matrix, k, min_score, scoring
            )
            for i, h in zip(good, hits, strict=True):
                results[i] = ProbeOutcome(hits=h)
        return results, searched

    async def verify(
        self,
        gallery: str,
        a: VerifyOperand,
        b: VerifyOperand,
        threshold: float | None = None,
        scoring: str = "max",
        flip: bool = False,
        detect: DetectParams | None = None,
        model_checksum: str = "",
    ) -> VerifyResult:
        if threshold is None:
            threshold = self.settings.verify_threshold
        if not -1.0 <= threshold <= 1.0:
            raise InvalidArgument(f"threshold: must be in [-1, 1], got {threshold}")
        if scoring not in SCORINGS:
            raise InvalidArgument(f"scoring: must be max or mean, got {scoring!r}")
        operands = {"a": a, "b": b}
        for name, op in operands.items():
            if (op.sample is None) == (op.identity is None):
                raise InvalidArgument(f"{name}: set one of image, vector or identity")
        g = (await self._synced(gallery)) if gallery else None
        if g is None and (a.identity is not None or b.identity is not None):
            raise InvalidArgument("gallery: required when an operand is an identity")
        samples = {n: op.sample for n, op in operands.items() if op.sample is not None}
        has_images = any(s.image is not None for s in samples.values())
        has_vectors = any(s.vector is not None for s in samples.values())
        if g is not None:
            self._check_pin(g.row, has_images, has_vectors, model_checksum)
            dim = g.row.dim
        elif has_images:
            dim = self.embedding.info().embedding_dim
        else:
            dim = next(s.vector.size for s in samples.values() if s.vector is not None)
        for name, s in samples.items():
            if s.vector is not None:  # named as the request names it: "a.vector", not "a[0]"
                check_vector(s.vector, s.dim, dim, f"{name}.vector")
        sides: dict[str, tuple[np.ndarray, list[int]]] = {}
        for name, s in samples.items():
            outcome = (await self._outcomes([s], name, dim, flip, detect))[0]
            if not outcome.ok:
                raise InvalidArgument(outcome.error_message.replace(f"{name}[0]", name, 1))
            sides[name] = (outcome.vector[None, :], [0])  # type: ignore[index]
        for name, op in operands.items():
            if op.identity is not None:
                assert g is not None
                _, rows = await self.get_identity(gallery, op.identity, True)
                if not rows:
                    raise FailedPrecondition(
                        f"{name}: identity {shown(op.identity)} in gallery {shown(gallery)} "
                        "has no samples"
                    )
                vectors = np.stack([r.vector for r in rows]).astype(np.float32)
                ids = [r.sample_id for r in rows]
                if scoring == "mean":
                    mean = vectors.sum(axis=0)
                    vectors, ids = (mean / max(np.linalg.norm(mean), 1e-12))[None, :], [0]
                sides[name] = (vectors, ids)
        (va, ida), (vb, idb) = sides["a"], sides["b"]
        scores = va @ vb.T
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        score = float(scores[i, j])
        return VerifyResult(score, score >= threshold, float(threshold), ida[i], idb[j])

    # -- export / import -----------------------------------------------------------------

    async def export(self, name: str) -> AsyncIterator[bytes]:
        g = await self._synced(name)
        conn = self.store.connect()
        chunks = self._export_chunks(conn, g.row)
        loop = asyncio.get_running_loop()
        try:
            while (
                chunk := await loop.run_in_executor(self._reads, next, chunks, None)
            ) is not None:
                yield chunk
        finally:
            chunks.close()
            conn.close()

    def _export_chunks(self, conn: Any, row: GalleryRow) -> Iterator[bytes]:
        # One read transaction: the file is a consistent point-in-time copy.
        conn.execute("BEGIN")
        try:
            if not db.gallery_exists(conn, row.gallery_id):
                raise NotFound(f"gallery {shown(row.name)} not found")
            header = {
                "name": row.name,
                "model_checksum": row.model_checksum,
                "model_name": row.model_name,
                "dim": row.dim,
                "metadata": row.metadata,
                "created_at": row.created_at,
            }
            yield from export_stream(
                header, group_export(db.iter_export_rows(conn, row.gallery_id), row.dim)
            )
        finally:
            conn.execute("COMMIT")

    async def import_gallery(
        self, name: str, fmt: str, model_checksum: str, data: bytes
    ) -> GalleryView:
        self._check_open()
        if fmt not in FORMATS:
            raise InvalidArgument(f"header.format: must be native or seed_pth, got {fmt!r}")
        if fmt == "seed_pth":
            if not name:
                raise InvalidArgument("header.name: required for the seed gallery.pth format")
            check_name(name, "header.name")
            served_name = ""
            if not model_checksum:
                model_checksum, served_name = self._served()
            parsed = await self._read(parse_seed_pth, data, name, model_checksum)
            parsed.model_name = served_name
        else:
            parsed = await self._read_until_stopped(parse_native, data)
            parsed.name = name or parsed.name
        check_name(parsed.name, "header.name")
        await self._sync()
        if parsed.name in self._galleries:
            raise AlreadyExists(f"gallery {shown(parsed.name)} already exists")
        await self._read(check_import, parsed)
        index = self._new_index(parsed.dim, parsed.sample_count)

        def op(conn):
            if db.gallery_id_of(conn, parsed.name) is not None:
                raise AlreadyExists(f"gallery {shown(parsed.name)} already exists")
            row = db.insert_gallery(
                conn,
                parsed.name,
                parsed.model_checksum,
                parsed.model_name,
                parsed.dim,
                parsed.metadata,
            )
            change = insert_imported(conn, row.gallery_id, parsed.identities)
            g = LiveGallery(row, index, len(parsed.identities), parsed.sample_count)

            def apply() -> None:
                index.apply([change])
                self._galleries[row.name] = g

            return g, self._logged(conn, row.gallery_id, changelog.RELOAD, None, apply)

        g = await self._write(op)
        log.info(
            "imported gallery %s: %d identities, %d samples",
            parsed.name,
            g.identities,
            g.samples,
        )
        return g.view()
