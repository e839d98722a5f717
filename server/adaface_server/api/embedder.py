"""Embedder gRPC servicer: a thin layer between protobuf messages and EmbeddingService."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

from ..embedding import EmbeddingService
from ..errors import InvalidArgument, ServiceError
from . import convert
from .status import status_code, unary_errors

log = logging.getLogger(__name__)

#: Trailing-metadata key carrying the serialized EmbedResponse when every image failed, so
#: callers still learn each image's own reason from the INVALID_ARGUMENT status.
FAILED_RESPONSE_KEY = "adaface-embed-response-bin"


class AllImagesFailed(InvalidArgument):
    def __init__(self, response: embedder_pb2.EmbedResponse, message: str) -> None:
        super().__init__(message)
        self.response = response
        self.trailing_metadata = ((FAILED_RESPONSE_KEY, response.SerializeToString()),)


class EmbedderServicer(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, service: EmbeddingService) -> None:
        self._service = service

    async def _embed(self, request: embedder_pb2.EmbedRequest) -> embedder_pb2.EmbedResponse:
        rid = convert.request_id(request.request_id)
        items = convert.image_items(request)
        outcomes = await self._service.embed(items, flip=request.options.flip_fusion)
        response = convert.embed_response(rid, outcomes, self._service.info().model_name)
        if not any(o.ok for o in outcomes):
            raise AllImagesFailed(response, convert.all_failed_message(outcomes))
        return response

    @unary_errors
    async def Embed(self, request, context):
        return await self._embed(request)

    @unary_errors
    async def Info(self, request, context):
        return convert.info_response(self._service.info(), self._service.settings)

    async def EmbedStream(
        self, request_iterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[embedder_pb2.EmbedResponse]:
        """Requests run concurrently (bounded); each response is yielded as it completes."""
        window = asyncio.Semaphore(self._service.settings.max_stream_inflight)
        done: asyncio.Queue = asyncio.Queue()
        finished = object()

        async def handle(request: embedder_pb2.EmbedRequest) -> None:
            try:
                response = await self._embed(request)
            except AllImagesFailed as exc:
                response = exc.response
                response.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                response.error.message = str(exc)
            except ServiceError as exc:
                response = _stream_error(request, status_code(exc), str(exc))
            except Exception:
                log.exception("unhandled error in EmbedStream")
                response = _stream_error(request, grpc.StatusCode.INTERNAL, "internal error")
            await done.put(response)

        async def read() -> None:
            tasks = set()
            try:
                async for request in request_iterator:
                    # Released when the response is yielded: a client that stops reading
                    # stops the server from taking more of its requests.
                    await window.acquire()
                    task = asyncio.create_task(handle(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await done.put(finished)

        reader = asyncio.create_task(read())
        try:
            while (item := await done.get()) is not finished:
                yield item
                window.release()
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()


def _stream_error(
    request: embedder_pb2.EmbedRequest, code: grpc.StatusCode, message: str
) -> embedder_pb2.EmbedResponse:
    return embedder_pb2.EmbedResponse(
        request_id=request.request_id,
        error=common_pb2.StreamError(code=code.value[0], message=message),
    )
