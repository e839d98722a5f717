"""Gallery gRPC servicer: protobuf <-> GalleryService conversion, errors mapped to status."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

import grpc
import numpy as np

from adaface.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc

from ..errors import InvalidArgument, ServiceError
from ..gallery.records import (
    EnrollResult,
    GalleryView,
    ProbeOutcome,
    SampleInput,
    VerifyOperand,
)
from ..gallery.service import GalleryService
from ..gallery.store import IdentityRow, SampleRow
from . import convert
from .status import status_code
from .streams import concurrent_responses

log = logging.getLogger(__name__)

_SCORING = {
    gallery_pb2.SCORING_UNSPECIFIED: "max",
    gallery_pb2.SCORING_MAX: "max",
    gallery_pb2.SCORING_MEAN: "mean",
}
_MODES = {
    gallery_pb2.ENROLL_MODE_UNSPECIFIED: "create",
    gallery_pb2.ENROLL_MODE_CREATE: "create",
    gallery_pb2.ENROLL_MODE_APPEND: "append",
    gallery_pb2.ENROLL_MODE_UPSERT: "upsert",
}
_FORMATS = {
    gallery_pb2.IMPORT_FORMAT_UNSPECIFIED: "native",
    gallery_pb2.IMPORT_FORMAT_NATIVE: "native",
    gallery_pb2.IMPORT_FORMAT_SEED_PTH: "seed_pth",
}


def _enum(table: dict[int, str], value: int, field: str) -> str:
    if value not in table:
        raise InvalidArgument(f"{field}: unknown value {value}")
    return table[value]


def _vector(msg: common_pb2.Embedding, field: str) -> SampleInput:
    if len(msg.vector) % 4:
        raise InvalidArgument(
            f"{field}: {len(msg.vector)} bytes is not a whole number of float32 values"
        )
    if not math.isfinite(msg.norm):
        # Kept as the sample's quality: SQLite turns NaN into NULL, JSON exports have no inf.
        raise InvalidArgument(f"{field}.norm: must be finite, got {msg.norm}")
    vector = np.frombuffer(msg.vector, dtype="<f4").astype(np.float32)
    return SampleInput(vector=vector, dim=msg.dim, norm=msg.norm)


def _sample(msg: gallery_pb2.GallerySample, field: str) -> SampleInput:
    source = msg.WhichOneof("source")
    if source == "image":
        return SampleInput(image=convert.image_item(msg.image, f"{field}.image"))
    if source == "vector":
        return _vector(msg.vector, f"{field}.vector")
    raise InvalidArgument(f"{field}: set either image or vector")


def _operand(msg: gallery_pb2.VerifyOperand, field: str) -> VerifyOperand:
    source = msg.WhichOneof("source")
    if source == "image":
        image = convert.image_item(msg.image, f"{field}.image")
        return VerifyOperand(sample=SampleInput(image=image))
    if source == "vector":
        return VerifyOperand(sample=_vector(msg.vector, f"{field}.vector"))
    if source == "identity":
        return VerifyOperand(identity=msg.identity)
    raise InvalidArgument(f"{field}: set one of image, vector or identity")


def _image_error(reason: str | None, message: str) -> common_pb2.ImageError:
    return common_pb2.ImageError(
        reason=common_pb2.ImageError.Reason.Value("REASON_" + (reason or "UNSPECIFIED")),
        message=message,
    )


def gallery_info(view: GalleryView) -> gallery_pb2.GalleryInfo:
    return gallery_pb2.GalleryInfo(
        name=view.name,
        model_checksum=view.model_checksum,
        model_name=view.model_name,
        dim=view.dim,
        identity_count=view.identity_count,
        sample_count=view.sample_count,
        created_at=view.created_at,
        metadata=view.metadata,
        index=view.index,
        dtype=view.dtype,
        index_bytes=view.index_bytes,
    )


def _identity(
    row: IdentityRow, samples: list[SampleRow] | None = None
) -> gallery_pb2.GalleryIdentity:
    msg = gallery_pb2.GalleryIdentity(
        identity=row.name,
        metadata=row.metadata,
        sample_count=row.sample_count,
        created_at=row.created_at,
    )
    for s in samples or ():
        stored = msg.samples.add(sample_id=s.sample_id, created_at=s.created_at)
        if s.vector.size:
            stored.vector.vector = np.asarray(s.vector, "<f4").tobytes()
            stored.vector.dim = s.vector.size
            stored.vector.norm = s.norm
    return msg


def _enroll_response(rid: str, result: EnrollResult) -> gallery_pb2.EnrollResponse:
    response = gallery_pb2.EnrollResponse(
        request_id=rid,
        identity=result.identity,
        sample_count=result.sample_count,
        created=result.created,
    )
    for i, s in enumerate(result.samples):
        item = response.samples.add(index=i, sample_id=s.sample_id)
        if s.error_reason is not None or s.error_message:
            item.error.CopyFrom(_image_error(s.error_reason, s.error_message))
    return response


def _search_response(outcomes: list[ProbeOutcome], searched: int) -> gallery_pb2.SearchResponse:
    response = gallery_pb2.SearchResponse(searched_identities=searched)
    for i, o in enumerate(outcomes):
        result = response.results.add(index=i)
        if o.error_reason is not None or o.error_message:
            result.error.CopyFrom(_image_error(o.error_reason, o.error_message))
            continue
        for h in o.hits:
            result.matches.add(identity=h.identity, score=cosine(h.score), sample_id=h.sample_id)
    return response


class GalleryServicer(gallery_pb2_grpc.GalleryServicer):
    def __init__(self, service: GalleryService) -> None:
        self._service = service

    async def CreateGallery(self, request, context):
        view = await self._service.create(
            request.name, request.model_checksum, request.dim, dict(request.metadata)
        )
        return gallery_info(view)

    async def GetGallery(self, request, context):
        return gallery_info(await self._service.get(request.name))

    async def ListGalleries(self, request, context):
        views = await self._service.list()
        return gallery_pb2.ListGalleriesResponse(galleries=[gallery_info(v) for v in views])

    async def DeleteGallery(self, request, context):
        identities, samples = await self._service.delete(request.name)
        return gallery_pb2.DeleteGalleryResponse(
            identities_removed=identities, samples_removed=samples
        )

    async def _enroll(self, request: gallery_pb2.EnrollRequest) -> gallery_pb2.EnrollResponse:
        rid = convert.request_id(request.request_id)
        samples = [_sample(s, f"samples[{i}]") for i, s in enumerate(request.samples)]
        result = await self._service.enroll(
            request.gallery,
            request.identity,
            dict(request.metadata),
            samples,
            mode=_enum(_MODES, request.mode, "mode"),
            flip=request.options.flip_fusion,
            detect=convert.detect_params(request.options.detection, "options.detection"),
            model_checksum=request.model_checksum,
        )
        return _enroll_response(rid, result)

    async def Enroll(self, request, context):
        return await self._enroll(request)

    async def EnrollStream(
        self, request_iterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gallery_pb2.EnrollResponse]:
        """Requests run concurrently (bounded), so their commits share fsyncs."""

        async def handle(request: gallery_pb2.EnrollRequest) -> gallery_pb2.EnrollResponse:
            try:
                return await self._enroll(request)
            except ServiceError as exc:
                return _stream_error(request, status_code(exc), str(exc))
            except Exception:
                log.exception("unhandled error in EnrollStream")
                return _stream_error(request, grpc.StatusCode.INTERNAL, "internal error")

        limit = self._service.settings.max_stream_inflight
        async for response in concurrent_responses(request_iterator, handle, limit):
            yield response

    async def RemoveSamples(self, request, context):
        identities, samples = await self._service.remove_samples(
            request.gallery, list(request.sample_ids)
        )
        return gallery_pb2.RemoveResponse(identities_removed=identities, samples_removed=samples)

    async def RemoveIdentity(self, request, context):
        identities, samples = await self._service.remove_identity(request.gallery, request.identity)
        return gallery_pb2.RemoveResponse(identities_removed=identities, samples_removed=samples)

    async def GetIdentity(self, request, context):
        row, samples = await self._service.get_identity(
            request.gallery, request.identity, request.include_vectors
        )
        return _identity(row, samples)

    async def ListIdentities(self, request, context):
        rows, token = await self._service.list_identities(
            request.gallery, request.page_size, request.page_token
        )
        return gallery_pb2.ListIdentitiesResponse(
            identities=[_identity(r) for r in rows], next_page_token=token
        )

    async def Search(self, request, context):
        probes = [_sample(p, f"probes[{i}]") for i, p in enumerate(request.probes)]
        outcomes, searched = await self._service.search(
            request.gallery,
            probes,
            top_k=request.top_k,
            min_score=request.min_score if request.HasField("min_score") else None,
            scoring=_enum(_SCORING, request.scoring, "scoring"),
            flip=request.options.flip_fusion,
            detect=convert.detect_params(request.options.detection, "options.detection"),
            model_checksum=request.model_checksum,
        )
        return _search_response(outcomes, searched)

    async def Verify(self, request, context):
        result = await self._service.verify(
            request.gallery,
            _operand(request.a, "a"),
            _operand(request.b, "b"),
            threshold=request.threshold if request.HasField("threshold") else None,
            scoring=_enum(_SCORING, request.scoring, "scoring"),
            flip=request.options.flip_fusion,
            detect=convert.detect_params(request.options.detection, "options.detection"),
            model_checksum=request.model_checksum,
        )
        return gallery_pb2.VerifyResponse(
            score=cosine(result.score),
            match=result.match,
            threshold=result.threshold,
            a_sample_id=result.a_sample_id,
            b_sample_id=result.b_sample_id,
        )

    async def Export(
        self, request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gallery_pb2.ExportChunk]:
        # Errors become statuses in the interceptor (api/interceptor.py), as for every stream.
        async for chunk in self._service.export(request.name):
            yield gallery_pb2.ExportChunk(data=chunk)

    async def Import(self, request_iterator, context):
        limit = self._service.settings.gallery_max_import_bytes
        header = None
        data = bytearray()
        async for message in request_iterator:
            part = message.WhichOneof("part")
            if header is None:
                if part != "header":
                    raise InvalidArgument("header: the first message must carry the header")
                header = message.header
            elif part == "data":
                if len(data) + len(message.data) > limit:
                    raise InvalidArgument(
                        f"data: the upload exceeds {limit} bytes (gallery_max_import_bytes)"
                    )
                data += message.data
            else:
                raise InvalidArgument("header: only the first message may carry the header")
        if header is None:
            raise InvalidArgument("header: the stream was empty")
        fmt = _enum(_FORMATS, header.format, "header.format")
        if not data:
            raise InvalidArgument("data: the stream carried no file after its header")
        view = await self._service.import_gallery(header.name, fmt, header.model_checksum, data)
        return gallery_info(view)


def _stream_error(
    request: gallery_pb2.EnrollRequest, code: grpc.StatusCode, message: str
) -> gallery_pb2.EnrollResponse:
    return gallery_pb2.EnrollResponse(
        request_id=request.request_id,
        identity=request.identity,
        error=common_pb2.StreamError(code=code.value[0], message=message),
    )


def cosine(score: float) -> float:
    """A cosine similarity within [-1, 1]: float32 rounding can put a vector's similarity
    with itself at 1.0000001, outside the range min_score and threshold accept."""
    return min(1.0, max(-1.0, score))
