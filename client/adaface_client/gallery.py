"""Synchronous client for the adaface.v1 Gallery service (no torch needed)."""

from __future__ import annotations

import io
import os
import queue
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import numpy as np

from adaface.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc

from .client import (
    AdafaceError,
    _check_args,
    _reason_name,
    _SyncChannel,
    from_rpc_error,
    make_image_input,
)
from .options import DetectionOptions
from .requests import _embed_options
from .transport import REQUEST_ID_KEY, current_request_id

__all__ = [
    "EnrollResult",
    "GalleryClient",
    "GalleryInfo",
    "IdentityInfo",
    "IdentityRef",
    "Match",
    "ProbeResult",
    "VerifyResult",
]

_CHUNK = 1 << 20
_SCORING = {"max": gallery_pb2.SCORING_MAX, "mean": gallery_pb2.SCORING_MEAN}
_MODES = {
    "create": gallery_pb2.ENROLL_MODE_CREATE,
    "append": gallery_pb2.ENROLL_MODE_APPEND,
    "upsert": gallery_pb2.ENROLL_MODE_UPSERT,
}
_FORMATS = {
    "native": gallery_pb2.IMPORT_FORMAT_NATIVE,
    "seed_pth": gallery_pb2.IMPORT_FORMAT_SEED_PTH,
}


# --------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class GalleryInfo:
    """What the server reports about one gallery."""

    name: str
    model_checksum: str
    model_name: str
    dim: int
    identity_count: int
    sample_count: int
    created_at: float
    metadata: dict[str, str]
    index: str
    dtype: str
    index_bytes: int

    @classmethod
    def from_proto(cls, m: gallery_pb2.GalleryInfo) -> GalleryInfo:
        return cls(
            m.name,
            m.model_checksum,
            m.model_name,
            m.dim,
            m.identity_count,
            m.sample_count,
            m.created_at,
            dict(m.metadata),
            m.index,
            m.dtype,
            m.index_bytes,
        )


@dataclass(frozen=True)
class EnrollResult:
    """One enrollment: sample ids per input (None where the sample failed) and the errors
    as (index, reason, message)."""

    identity: str
    created: bool
    sample_ids: list[int | None]
    errors: list[tuple[int, str, str]]
    sample_count: int
    request_id: str = ""

    @classmethod
    def from_proto(cls, m: gallery_pb2.EnrollResponse) -> EnrollResult:
        ids: list[int | None] = []
        errors = []
        for s in m.samples:
            if s.HasField("error"):
                ids.append(None)
                errors.append((s.index, _reason_name(s.error.reason), s.error.message))
            else:
                ids.append(s.sample_id)
        return cls(m.identity, m.created, ids, errors, m.sample_count, m.request_id)


@dataclass(frozen=True)
class StoredSample:
    sample_id: int
    created_at: float
    vector: np.ndarray | None = field(default=None, repr=False)
    norm: float = 0.0


@dataclass(frozen=True)
class IdentityInfo:
    identity: str
    metadata: dict[str, str]
    sample_count: int
    created_at: float
    samples: list[StoredSample] = field(default_factory=list)

    @classmethod
    def from_proto(cls, m: gallery_pb2.GalleryIdentity) -> IdentityInfo:
        samples = [
            StoredSample(
                s.sample_id,
                s.created_at,
                np.frombuffer(s.vector.vector, "<f4").astype(np.float32)
                if s.HasField("vector")
                else None,
                s.vector.norm,
            )
            for s in m.samples
        ]
        return cls(m.identity, dict(m.metadata), m.sample_count, m.created_at, samples)


@dataclass(frozen=True)
class Match:
    identity: str
    score: float
    sample_id: int


@dataclass(frozen=True)
class ProbeResult:
    """The matches for one probe (best first), or why the probe could not be searched."""

    index: int
    matches: list[Match]
    reason: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class VerifyResult:
    score: float
    match: bool
    threshold: float
    a_sample_id: int = 0
    b_sample_id: int = 0


@dataclass(frozen=True)
class IdentityRef:
    """A Verify operand naming an enrolled identity (of the `gallery` given to verify())."""

    identity: str


# --------------------------------------------------------------------------------------
# Input conversion

# A sample is an image (path, encoded bytes, PIL image, HxWx3 uint8 array, ImageInput) or a
# precomputed embedding (a 1-D float array).


def _embedding(vector: Any) -> common_pb2.Embedding:
    arr = np.asarray(vector, dtype="<f4")
    if arr.ndim != 1:
        raise ValueError(f"a vector must be 1-D, got shape {arr.shape}")
    return common_pb2.Embedding(vector=arr.tobytes(), dim=arr.size)


def _is_vector(item: Any) -> bool:
    if isinstance(item, np.ndarray):
        return item.ndim == 1
    return isinstance(item, (list, tuple)) and bool(item) and isinstance(item[0], (int, float))


def _samples(items: Any, landmarks: Any = None, alignment: Any = None) -> list:
    if isinstance(items, np.ndarray) and items.ndim == 2 and items.dtype != np.uint8:
        items = list(items)  # [m, d] float matrix: m vectors
    if isinstance(items, (str, bytes, os.PathLike)) or _is_vector(items):
        items = [items]
    items = list(items)
    marks = list(landmarks) if landmarks is not None else [None] * len(items)
    if len(marks) != len(items):
        raise ValueError(f"landmarks has {len(marks)} entries for {len(items)} samples")
    out = []
    for i, (item, lm) in enumerate(zip(items, marks, strict=True)):
        try:
            if isinstance(item, gallery_pb2.GallerySample):
                out.append(item)
            elif isinstance(item, common_pb2.ImageInput):
                out.append(gallery_pb2.GallerySample(image=item))
            elif _is_vector(item):
                out.append(gallery_pb2.GallerySample(vector=_embedding(item)))
            else:
                image = make_image_input(item, landmarks=lm, alignment=alignment)
                out.append(gallery_pb2.GallerySample(image=image))
        except (TypeError, ValueError) as e:
            raise type(e)(f"samples[{i}]: {e}") from None
    return out


def _operand(item: Any, alignment: Any = None) -> gallery_pb2.VerifyOperand:
    if isinstance(item, IdentityRef):
        return gallery_pb2.VerifyOperand(identity=item.identity)
    sample = _samples([item], alignment=alignment)[0]
    if sample.HasField("image"):
        return gallery_pb2.VerifyOperand(image=sample.image)
    return gallery_pb2.VerifyOperand(vector=sample.vector)


def _enum(table: Mapping[str, int], value: str, what: str) -> int:
    if value not in table:
        raise ValueError(f"{what} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


# --------------------------------------------------------------------------------------
# Client


class GalleryClient(_SyncChannel):
    """Blocking Gallery client. Retries UNAVAILABLE/RESOURCE_EXHAUSTED (e.g. while the
    server loads) with backoff; other failures raise typed AdafaceErrors (NotFound,
    AlreadyExists, FailedPrecondition, InvalidArgument, Unauthenticated, PermissionDenied
    for a write without an admin token, ...). `credentials` and `token` as for Client."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.2,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        _check_args(timeout, 1, retries, backoff)
        super().__init__(target, timeout, retries, backoff, credentials, token)
        self._stub = gallery_pb2_grpc.GalleryStub(self._channel)

    def __enter__(self) -> GalleryClient:
        return self

    # -- galleries -----------------------------------------------------------------------

    def create_gallery(
        self,
        name: str,
        *,
        model_checksum: str = "",
        dim: int = 0,
        metadata: Mapping[str, str] | None = None,
    ) -> GalleryInfo:
        """Create an empty gallery pinned to the served model (or to `model_checksum`)."""
        request = gallery_pb2.CreateGalleryRequest(
            name=name, model_checksum=model_checksum, dim=dim, metadata=dict(metadata or {})
        )
        return GalleryInfo.from_proto(self._call(self._stub.CreateGallery, request))

    def get_gallery(self, name: str) -> GalleryInfo:
        request = gallery_pb2.GetGalleryRequest(name=name)
        return GalleryInfo.from_proto(self._call(self._stub.GetGallery, request))

    def list_galleries(self) -> list[GalleryInfo]:
        response = self._call(self._stub.ListGalleries, gallery_pb2.ListGalleriesRequest())
        return [GalleryInfo.from_proto(g) for g in response.galleries]

    def delete_gallery(self, name: str) -> tuple[int, int]:
        """Delete a gallery; returns (identities, samples) removed."""
        r = self._call(self._stub.DeleteGallery, gallery_pb2.DeleteGalleryRequest(name=name))
        return r.identities_removed, r.samples_removed

    # -- identities ----------------------------------------------------------------------

    def _enroll_request(
        self,
        gallery: str,
        identity: str,
        samples: Any,
        metadata: Mapping[str, str] | None,
        mode: str,
        flip: bool,
        landmarks: Any,
        alignment: Any,
        model_checksum: str,
        detection: DetectionOptions | None = None,
    ) -> gallery_pb2.EnrollRequest:
        return gallery_pb2.EnrollRequest(
            request_id=uuid.uuid4().hex,
            gallery=gallery,
            identity=identity,
            metadata=dict(metadata or {}),
            samples=_samples(samples, landmarks, alignment),
            mode=_enum(_MODES, mode, "mode"),
            options=_embed_options(flip, detection),
            model_checksum=model_checksum,
        )

    def enroll(
        self,
        gallery: str,
        identity: str,
        samples: Any,
        *,
        metadata: Mapping[str, str] | None = None,
        mode: str = "create",
        flip: bool = False,
        landmarks: Any = None,
        alignment: Any = None,
        model_checksum: str = "",
        detection: DetectionOptions | None = None,
    ) -> EnrollResult:
        """Enroll `identity` with images and/or vectors (mode create, append or upsert).

        Images are photos by default (the server detects the best face; `detection` tunes
        it); pass alignment="aligned" for 112x112 crops. Samples whose image has no usable
        face are listed in `errors` and not enrolled.
        """
        request = self._enroll_request(
            gallery,
            identity,
            samples,
            metadata,
            mode,
            flip,
            landmarks,
            alignment,
            model_checksum,
            detection,
        )
        return EnrollResult.from_proto(self._call(self._stub.Enroll, request))

    def add_samples(self, gallery: str, identity: str, samples: Any, **kw: Any) -> EnrollResult:
        """More samples for an enrolled identity (NotFound when it is unknown)."""
        return self.enroll(gallery, identity, samples, mode="append", **kw)

    def enroll_many(
        self,
        gallery: str,
        items: Iterable[tuple[str, Any] | tuple[str, Any, Mapping[str, str]]],
        *,
        mode: str = "create",
        flip: bool = False,
        window: int = 32,
        alignment: Any = None,
        detection: DetectionOptions | None = None,
    ) -> Iterator[EnrollResult | AdafaceError]:
        """Bulk enrollment over one EnrollStream: yields, as each becomes durable, an
        EnrollResult, or the AdafaceError of an enrollment that failed as a whole.
        `items` are (identity, samples[, metadata]); at most `window` are unanswered."""
        slots = threading.Semaphore(window)
        requests: queue.Queue = queue.Queue()
        pending: dict[str, str] = {}
        problem: list[BaseException] = []
        stopping = threading.Event()

        def produce() -> None:
            try:
                for item in items:
                    if stopping.is_set():
                        break
                    identity, samples = item[0], item[1]
                    metadata = item[2] if len(item) > 2 else None  # type: ignore[misc]
                    request = self._enroll_request(
                        gallery,
                        identity,
                        samples,
                        metadata,
                        mode,
                        flip,
                        None,
                        alignment,
                        "",
                        detection,
                    )
                    slots.acquire()
                    if stopping.is_set():
                        break
                    pending[request.request_id] = identity
                    requests.put(request)
            except BaseException as e:  # surfaced to the caller below
                problem.append(e)
            finally:
                requests.put(None)

        def request_iter() -> Iterator[gallery_pb2.EnrollRequest]:
            while (request := requests.get()) is not None:
                yield request

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        # Chosen here so the per-enrollment errors can name the stream's request id.
        stream_id = current_request_id() or uuid.uuid4().hex
        stream = self._stub.EnrollStream(request_iter(), metadata=((REQUEST_ID_KEY, stream_id),))
        try:
            for response in stream:
                slots.release()
                pending.pop(response.request_id, None)
                if response.HasField("error"):
                    code = _status_code(response.error.code)
                    error = from_rpc_error(_StreamRpcError(code, response.error.message, stream_id))
                    error.identity = response.identity  # type: ignore[attr-defined]
                    yield error
                else:
                    yield EnrollResult.from_proto(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            # Unblock and stop the producer whether the stream ended or broke.
            stopping.set()
            slots.release()
            stream.cancel()
        producer.join()
        if problem:
            raise problem[0]

    def remove_samples(self, gallery: str, sample_ids: Sequence[int]) -> int:
        """Remove samples by id (all or none); returns how many were removed."""
        request = gallery_pb2.RemoveSamplesRequest(gallery=gallery, sample_ids=list(sample_ids))
        return self._call(self._stub.RemoveSamples, request).samples_removed

    def remove_identity(self, gallery: str, identity: str) -> int:
        """Remove an identity and its samples; returns the samples removed."""
        request = gallery_pb2.RemoveIdentityRequest(gallery=gallery, identity=identity)
        return self._call(self._stub.RemoveIdentity, request).samples_removed

    def get_identity(
        self, gallery: str, identity: str, *, include_vectors: bool = False
    ) -> IdentityInfo:
        request = gallery_pb2.GetIdentityRequest(
            gallery=gallery, identity=identity, include_vectors=include_vectors
        )
        return IdentityInfo.from_proto(self._call(self._stub.GetIdentity, request))

    def list_identities(self, gallery: str, *, page_size: int = 500) -> Iterator[IdentityInfo]:
        """Every identity in id order, fetched page by page."""
        token = ""
        while True:
            request = gallery_pb2.ListIdentitiesRequest(
                gallery=gallery, page_size=page_size, page_token=token
            )
            response = self._call(self._stub.ListIdentities, request)
            for m in response.identities:
                yield IdentityInfo.from_proto(m)
            token = response.next_page_token
            if not token:
                return

    # -- search and verify ---------------------------------------------------------------

    def search(
        self,
        gallery: str,
        probes: Any,
        *,
        top_k: int = 10,
        min_score: float | None = None,
        scoring: str = "max",
        flip: bool = False,
        landmarks: Any = None,
        alignment: Any = None,
        model_checksum: str = "",
        detection: DetectionOptions | None = None,
    ) -> list[ProbeResult]:
        """Top-k identities for each probe (images and/or vectors, or an [N, D] matrix).

        Image probes are photos by default; alignment="aligned" for 112x112 crops."""
        request = gallery_pb2.SearchRequest(
            gallery=gallery,
            probes=_samples(probes, landmarks, alignment),
            top_k=top_k,
            scoring=_enum(_SCORING, scoring, "scoring"),
            options=_embed_options(flip, detection),
            model_checksum=model_checksum,
        )
        if min_score is not None:
            request.min_score = min_score
        response = self._call(self._stub.Search, request)
        out = []
        for r in response.results:
            if r.HasField("error"):
                out.append(ProbeResult(r.index, [], _reason_name(r.error.reason), r.error.message))
            else:
                matches = [Match(m.identity, m.score, m.sample_id) for m in r.matches]
                out.append(ProbeResult(r.index, matches))
        return out

    def verify(
        self,
        a: Any,
        b: Any,
        *,
        gallery: str = "",
        threshold: float | None = None,
        scoring: str = "max",
        flip: bool = False,
        model_checksum: str = "",
        alignment: Any = None,
        detection: DetectionOptions | None = None,
    ) -> VerifyResult:
        """1:1 score of two operands: images, vectors or IdentityRef (needs `gallery`).

        Images are photos by default; alignment="aligned" for 112x112 crops."""
        request = gallery_pb2.VerifyRequest(
            gallery=gallery,
            a=_operand(a, alignment),
            b=_operand(b, alignment),
            scoring=_enum(_SCORING, scoring, "scoring"),
            options=_embed_options(flip, detection),
            model_checksum=model_checksum,
        )
        if threshold is not None:
            request.threshold = threshold
        r = self._call(self._stub.Verify, request)
        return VerifyResult(r.score, r.match, r.threshold, r.a_sample_id, r.b_sample_id)

    # -- export / import -----------------------------------------------------------------

    def export_chunks(self, gallery: str) -> Iterator[bytes]:
        """The gallery's export file, as streamed by the server."""
        try:
            for chunk in self._stub.Export(gallery_pb2.ExportRequest(name=gallery), timeout=None):
                yield chunk.data
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def export(self, gallery: str, out: str | os.PathLike | BinaryIO) -> int:
        """Write the gallery's export file to a path (atomically) or file object; returns bytes."""
        if hasattr(out, "write"):
            return sum(out.write(chunk) for chunk in self.export_chunks(gallery))  # type: ignore[union-attr]
        path = Path(out)  # type: ignore[arg-type]
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as f:
                written = sum(f.write(chunk) for chunk in self.export_chunks(gallery))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def import_gallery(
        self,
        source: str | os.PathLike | bytes | BinaryIO,
        *,
        name: str = "",
        format: str = "native",
        model_checksum: str = "",
    ) -> GalleryInfo:
        """Create a gallery from an export file, or from the seed's gallery.pth
        (format="seed_pth", which needs `name`)."""
        header = gallery_pb2.ImportHeader(
            name=name, format=_enum(_FORMATS, format, "format"), model_checksum=model_checksum
        )

        def chunks(f: BinaryIO) -> Iterator[gallery_pb2.ImportRequest]:
            yield gallery_pb2.ImportRequest(header=header)
            while data := f.read(_CHUNK):
                yield gallery_pb2.ImportRequest(data=data)

        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                return GalleryInfo.from_proto(
                    self._stub.Import(chunks(io.BytesIO(bytes(source))), timeout=None)
                )
            if hasattr(source, "read"):
                return GalleryInfo.from_proto(self._stub.Import(chunks(source), timeout=None))  # type: ignore[arg-type]
            with open(source, "rb") as f:  # type: ignore[arg-type]
                return GalleryInfo.from_proto(self._stub.Import(chunks(f), timeout=None))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None


class _StreamRpcError(grpc.RpcError):
    """An EnrollStream per-message error shaped like an RpcError for from_rpc_error."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details
        self._request_id = request_id

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self._request_id),) if self._request_id else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
