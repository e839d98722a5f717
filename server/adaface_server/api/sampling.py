"""Sampling gRPC servicer: streams identities into SamplingService, streams the index back."""

from __future__ import annotations

import grpc

from adaface.v1 import sampling_pb2, sampling_pb2_grpc

from ..errors import InvalidArgument
from ..sampling.service import (
    EpochIndex,
    PrototypeEmbedder,
    PrototypeTable,
    SamplingOptions,
    SamplingService,
)
from . import convert


def _options(msg: sampling_pb2.SamplingOptions) -> SamplingOptions:
    return SamplingOptions(
        batch_size=msg.batch_size,
        num_instance=msg.num_instance,
        seed=msg.seed,
        epoch=msg.epoch,
        dim=msg.dim,
        flip=msg.flip_fusion,
        first_pass_in_order=msg.first_pass_in_order,
    )


class SamplingServicer(sampling_pb2_grpc.SamplingServicer):
    def __init__(self, service: SamplingService) -> None:
        self._service = service

    # The reply is written with context.write(), and every check runs before the first
    # write, so a failure becomes a plain status (in the interceptor), as for unary calls.
    async def BuildEpoch(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # A build slot is taken only once every input has arrived: a stream left open
        # without its end holds no slot (and is ended after stream_idle_seconds).
        table, images = await self._receive(request_iterator)
        try:
            with self._service.build_slot():
                index = await self._service.build(table, images)
                await self._send(index, context)
        finally:
            await images.cancel()

    async def _send(self, index: EpochIndex, context: grpc.aio.ServicerContext) -> None:
        plan = index.plan
        await context.write(
            sampling_pb2.BuildEpochResponse(
                header=sampling_pb2.EpochHeader(
                    num_identities=plan.num_batches,
                    num_samples=plan.num_samples,
                    length=plan.length,
                    num_batches=plan.num_batches,
                    batch_size=plan.batch_size,
                    num_instance=plan.num_instance,
                    position_bytes=int(index.position_dtype[-1]),
                    knn_precision=index.knn_precision,
                    model_name=index.model_name,
                )
            )
        )
        async for chunk in self._service.positions(index):
            await context.write(sampling_pb2.BuildEpochResponse(positions=chunk))
        for chunk in self._service.cursor_chunks(index):
            await context.write(sampling_pb2.BuildEpochResponse(cursors=chunk))

    async def _receive(self, request_iterator) -> tuple[PrototypeTable, PrototypeEmbedder]:
        table: PrototypeTable | None = None
        images: PrototypeEmbedder | None = None
        message = 0
        try:
            async for request in request_iterator:
                if table is None or images is None:
                    if not request.HasField("options"):
                        raise InvalidArgument(
                            "options: the first message must set options (batch_size, num_instance)"
                        )
                    table = self._service.table(_options(request.options))
                    images = self._service.images(table)
                elif request.HasField("options"):
                    raise InvalidArgument(
                        f"messages[{message}].options: only the first message may set options"
                    )
                for record in request.identities:
                    kind = record.WhichOneof("prototype")
                    image = None
                    if kind == "image":
                        image = convert.image_item(record.image, f"identities[{len(table)}].image")
                    table.add(
                        record.pid,
                        record.sample_count,
                        record.cursor,
                        vector=record.vector if kind == "vector" else None,
                        image=image,
                    )
                # Embeds full chunks of image prototypes while more identities arrive.
                await images.feed()
                message += 1
        except BaseException:
            if images is not None:
                await images.cancel()
            raise
        if table is None or images is None:
            raise InvalidArgument("options: empty request stream; send options first")
        return table, images
