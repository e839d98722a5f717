"""asyncio client for the adaface.v1 Embedder service on grpc.aio (no torch needed)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import numpy as np

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_client import retry
from adaface_client.errors import from_rpc_error
from adaface_client.inputs import AlignmentLike, ImageLike, LandmarksLike, _prepared
from adaface_client.options import _CHANNEL_OPTIONS, DetectionOptions, _check_args
from adaface_client.requests import (
    _assemble,
    _detect_request,
    _finish_embed,
    _Job,
    _jobs,
    _max_images,
    _parse_detect,
    _parse_response,
    _recover,
    _request,
)
from adaface_client.results import DetectResult, ImageResult, ServerInfo
from adaface_client.transport import open_aio_channel

__all__ = ["AsyncClient"]


class AsyncClient:
    """asyncio twin of Client on grpc.aio; all calls are coroutines.

    At most `max_in_flight` Embed calls are outstanding per client (a semaphore shared by
    concurrent embed() calls). `credentials` and `token` as for Client.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        max_in_flight: int = 4,
        retries: int = 4,
        backoff: float = 0.2,
        flip: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        batch_size: int | None = None,
        token: str | None = None,
    ) -> None:
        _check_args(timeout, max_in_flight, retries, backoff)
        self.target = target
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.backoff = backoff
        self.flip = flip
        self.batch_size = batch_size
        self._channel = open_aio_channel(target, credentials, token, _CHANNEL_OPTIONS)
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self._info: ServerInfo | None = None
        # Created lazily: asyncio primitives bind to the loop they are first used on.
        self._semaphore: asyncio.Semaphore | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        for attempt in itertools.count():
            try:
                return await method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() in retry._RETRYABLE and attempt < self.retries:
                    await asyncio.sleep(retry.backoff_delay(self.backoff, attempt))
                    continue
                raise from_rpc_error(e) from None
        raise AssertionError("unreachable")

    async def info(self) -> ServerInfo:
        """Ask the server for its model and limits (and refresh the cached copy)."""
        self._info = ServerInfo.from_proto(
            await self._call(self._stub.Info, embedder_pb2.InfoRequest())
        )
        return self._info

    async def _cached_info(self) -> ServerInfo:
        return self._info if self._info is not None else await self.info()

    async def detect(
        self, images: Iterable[ImageLike], detection: DetectionOptions | None = None
    ) -> list[DetectResult]:
        """Face detection only: boxes, scores, landmarks (and crops) per image, in order."""
        options = (detection or DetectionOptions()).to_proto()
        prepared = _prepared(images, None, "detect")
        info = await self._cached_info()
        out: list[DetectResult] = []
        for job in _jobs(prepared, _max_images(info, self.batch_size)):
            resp = await self._call(self._stub.Detect, _detect_request(job, options))
            out.extend(_parse_detect(resp, job))
        return out

    async def embed(
        self,
        images: Iterable[ImageLike],
        *,
        alignment: AlignmentLike | Sequence[AlignmentLike] = None,
        landmarks: Iterable[LandmarksLike] | None = None,
        flip: bool | None = None,
        detection: DetectionOptions | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed images; returns (embeddings float32 [N,D], norms float32 [N,1]) in input order.

        Photos by default (the server detects the best face); alignment="aligned" for
        112x112 crops. Raises ImageErrors (with the partial results) when any image failed.
        """
        results = await self.embed_results(
            images, alignment=alignment, landmarks=landmarks, flip=flip, detection=detection
        )
        return _finish_embed(results, (await self._cached_info()).embedding_dim)

    async def embed_results(
        self,
        images: Iterable[ImageLike],
        *,
        alignment: AlignmentLike | Sequence[AlignmentLike] = None,
        landmarks: Iterable[LandmarksLike] | None = None,
        flip: bool | None = None,
        progress: Callable[[int], None] | None = None,
        detection: DetectionOptions | None = None,
    ) -> list[ImageResult]:
        """Embed images; one ImageResult per image in input order, failures included.

        `detection` applies to images sent with alignment "detect" (the default)."""
        use_flip = self.flip if flip is None else flip
        prepared = _prepared(images, landmarks, alignment)
        if detection is not None:
            detection.to_proto()  # a bad selection fails before any request goes out
        info = await self._cached_info()
        jobs = _jobs(prepared, _max_images(info, self.batch_size))
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
        parts: dict[int, list[ImageResult]] = {}

        async def process(job: _Job) -> None:
            while True:
                try:
                    async with self._semaphore:  # type: ignore[union-attr]
                        request = _request(job, use_flip, detection)
                        resp = await self._stub.Embed(request, timeout=self.timeout)
                except grpc.RpcError as e:
                    code = e.code()
                    if code in retry._RETRYABLE and job.attempt < self.retries:
                        await asyncio.sleep(retry.backoff_delay(self.backoff, job.attempt))
                        job.attempt += 1
                        continue
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        results = _recover(job, e)
                        break
                    raise from_rpc_error(e) from None
                results = _parse_response(resp, job)
                break
            parts[job.start] = results
            if progress is not None:
                progress(len(results))

        async def worker() -> None:
            # Workers share one lazy job iterator, so inputs are read as slots free up.
            for job in jobs:
                await process(job)

        tasks = [asyncio.ensure_future(worker()) for _ in range(self.max_in_flight)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return _assemble(parts)
