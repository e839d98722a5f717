"""Embedder gRPC servicer: a thin layer between protobuf messages and EmbeddingService."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

from ..embedding import EmbeddingService
from ..errors import InvalidArgument, ServiceError
from . import convert
from .status import status_code
from .streams import concurrent_responses

log = logging.getLogger(__name__)

#: Trailing-metadata key carrying the serialized EmbedResponse when every image failed, so
#: callers still learn each image's own reason from the INVALID_ARGUMENT status.
FAILED_RESPONSE_KEY = "adaface-embed-response-bin"


#: gRPC clients refuse more than 8 KiB of response metadata by default. The failed-images
#: response travels base64-encoded (4/3 larger) beside the status message (up to 1,000 bytes,
#: up to 3x that once percent-encoded) and the request id: its per-image messages are cut so
#: that it stays within this many bytes.
MAX_FAILED_RESPONSE_BYTES = 3072


class AllImagesFailed(InvalidArgument):
    def __init__(self, response: embedder_pb2.EmbedResponse, message: str) -> None:
        super().__init__(message)
        self.response = response  # whole, for streams (answered in-band)
        self.trailing_metadata = ((FAILED_RESPONSE_KEY, fitted_failures(response)),)


def fitted_failures(response: embedder_pb2.EmbedResponse) -> bytes:
    """`response` serialized within MAX_FAILED_RESPONSE_BYTES: every image keeps its index,
    reason and the start of its message; the message budget is shared equally."""
    data = response.SerializeToString()
    if len(data) <= MAX_FAILED_RESPONSE_BYTES:
        return data
    trimmed = embedder_pb2.EmbedResponse()
    trimmed.CopyFrom(response)
    for result in trimmed.results:
        result.error.message = ""
    # 2 bytes a message for its length prefix growing past one byte.
    share = (MAX_FAILED_RESPONSE_BYTES - trimmed.ByteSize()) // max(1, len(trimmed.results)) - 2
    for result, whole in zip(trimmed.results, response.results, strict=True):
        result.error.message = _cut(whole.error.message, share)
    return trimmed.SerializeToString()


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, ending with "..." when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    if limit < 4:
        return ""
    return data[: limit - 3].decode(errors="ignore") + "..."


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, service: EmbeddingService) -> None:
        self._service = service

    async def _embed(self, request: embedder_pb2.EmbedRequest) -> embedder_pb2.EmbedResponse:
        rid = convert.request_id(request.request_id)
        items = convert.image_items(request)
        detect = convert.detect_params(request.options.detection, "options.detection")
        outcomes = await self._service.embed(items, flip=request.options.flip_fusion, detect=detect)
        response = convert.embed_response(rid, outcomes, self._service.info().model_name)
        if not any(o.ok for o in outcomes):
            raise AllImagesFailed(response, convert.all_failed_message(outcomes))
        return response

    async def Embed(self, request, context):
        return await self._embed(request)

    async def Detect(self, request, context):
        rid = convert.request_id(request.request_id)
        items = convert.detect_items(request)
        params = convert.detect_params(request.options, "options")
        return convert.detect_response(rid, await self._service.detect(items, params))

    async def Info(self, request, context):
        return convert.info_response(self._service.info(), self._service.settings)

    async def EmbedStream(
        self, request_iterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[embedder_pb2.EmbedResponse]:
        """Requests run concurrently (bounded); each response is yielded as it completes."""

        async def handle(request: embedder_pb2.EmbedRequest) -> embedder_pb2.EmbedResponse:
            try:
                return await self._embed(request)
            except AllImagesFailed as exc:
                response = exc.response
                response.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                response.error.message = str(exc)
                return response
            except ServiceError as exc:
                return _stream_error(request, status_code(exc), str(exc))
            except Exception:
                log.exception("unhandled error in EmbedStream")
                return _stream_error(request, grpc.StatusCode.INTERNAL, "internal error")

        limit = self._service.settings.max_stream_inflight
        async for response in concurrent_responses(request_iterator, handle, limit):
            yield response


def _stream_error(
    request: embedder_pb2.EmbedRequest, code: grpc.StatusCode, message: str
) -> embedder_pb2.EmbedResponse:
    return embedder_pb2.EmbedResponse(
        request_id=request.request_id,
        error=common_pb2.StreamError(code=code.value[0], message=message),
    )
