"""Blocking client for the adaface.v1 Embedder service (no torch needed).

The names once defined here (errors, results, options, input helpers, AsyncClient) are
re-exported, so `from adaface_client.client import ...` keeps working."""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_client import retry
from adaface_client.aio import AsyncClient
from adaface_client.errors import (
    AdafaceError,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    ImageErrors,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    from_rpc_error,
)
from adaface_client.inputs import (
    AlignmentLike,
    ImageLike,
    LandmarksLike,
    _prepared,
    make_image_input,
)
from adaface_client.options import _CHANNEL_OPTIONS, DetectionOptions, _check_args
from adaface_client.requests import (
    FAILED_RESPONSE_KEY,
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
from adaface_client.results import DetectedFace, DetectResult, ImageResult, ServerInfo, _reason_name
from adaface_client.retry import _RETRYABLE, call_with_retries
from adaface_client.retry import backoff_delay as _backoff_delay
from adaface_client.transport import open_channel

__all__ = [
    "AdafaceError",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "DetectResult",
    "DetectedFace",
    "DetectionOptions",
    "FailedPrecondition",
    "ImageErrors",
    "ImageResult",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerInfo",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "make_image_input",
]

# Kept importable from here for modules and tests that reach for these helpers by name.
_REEXPORTED = (
    FAILED_RESPONSE_KEY,
    _RETRYABLE,
    _backoff_delay,
    _reason_name,
    _Job,
    _jobs,
    AlignmentLike,
    ImageLike,
    LandmarksLike,
)


class _SyncChannel:
    """What every blocking client shares: one channel, retried typed unary calls, closing.

    Subclasses add `__enter__` returning their own type."""

    def __init__(
        self,
        target: str,
        timeout: float,
        retries: int,
        backoff: float,
        credentials: grpc.ChannelCredentials | None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._channel = open_channel(target, credentials, token, _CHANNEL_OPTIONS)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        return call_with_retries(method, request, self.timeout, self.retries, self.backoff)


class Client(_SyncChannel):
    """Blocking Embedder client: chunks to the server's limits, pipelines requests, retries.

    Retries UNAVAILABLE and RESOURCE_EXHAUSTED up to `retries` times with exponential backoff
    and jitter; other failures (Unauthenticated, PermissionDenied, ...) raise a typed
    AdafaceError at once. `timeout` bounds each attempt. `batch_size` caps images per request
    below the server's limit. `credentials`: e.g. tls_credentials(ca, certificate,
    private_key) for TLS (default: plaintext); `token`: sent as `authorization: Bearer
    <token>` on every call. Every call also carries an `x-request-id` (see use_request_id).
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
        super().__init__(target, timeout, retries, backoff, credentials, token)
        self.max_in_flight = max_in_flight
        self.flip = flip
        self.batch_size = batch_size
        self._stub = embedder_pb2_grpc.EmbedderStub(self._channel)
        self._info: ServerInfo | None = None
        self._info_lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def info(self) -> ServerInfo:
        """Ask the server for its model and limits (and refresh the cached copy)."""
        info = ServerInfo.from_proto(self._call(self._stub.Info, embedder_pb2.InfoRequest()))
        with self._info_lock:
            self._info = info
        return info

    def _cached_info(self) -> ServerInfo:
        with self._info_lock:
            info = self._info
        return info if info is not None else self.info()

    def embed(
        self,
        images: Iterable[ImageLike],
        *,
        alignment: AlignmentLike | Sequence[AlignmentLike] = None,
        landmarks: Iterable[LandmarksLike] | None = None,
        flip: bool | None = None,
        detection: DetectionOptions | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed images; returns (embeddings float32 [N,D], norms float32 [N,1]) in input order.

        An image without landmarks is a photo: the server detects and aligns its best face.
        Pass alignment="aligned" for pre-aligned 112x112 crops. Raises ImageErrors (with the
        partial results) when any image failed.
        """
        results = self.embed_results(
            images, alignment=alignment, landmarks=landmarks, flip=flip, detection=detection
        )
        return _finish_embed(results, self._cached_info().embedding_dim)

    def embed_results(
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

        Per-image failures never raise. `progress(n)` is called as each n images finish.
        `detection` applies to images sent with alignment "detect".
        """
        use_flip = self.flip if flip is None else flip
        prepared = _prepared(images, landmarks, alignment)
        if detection is not None:
            detection.to_proto()  # a bad selection fails before any request goes out
        info = self._cached_info()
        jobs = _jobs(prepared, _max_images(info, self.batch_size))
        return _assemble(self._run(jobs, use_flip, progress, detection))

    def detect(
        self, images: Iterable[ImageLike], detection: DetectionOptions | None = None
    ) -> list[DetectResult]:
        """Face detection only: boxes, scores, landmarks (and crops) per image, in order."""
        options = (detection or DetectionOptions()).to_proto()
        prepared = _prepared(images, None, "detect")
        info = self._cached_info()
        out: list[DetectResult] = []
        for job in _jobs(prepared, _max_images(info, self.batch_size)):
            resp = self._call(self._stub.Detect, _detect_request(job, options))
            out.extend(_parse_detect(resp, job))
        return out

    def _run(
        self,
        jobs: Iterator[_Job],
        flip: bool,
        progress: Callable[[int], None] | None,
        detection: DetectionOptions | None = None,
    ) -> dict[int, list[ImageResult]]:
        parts: dict[int, list[ImageResult]] = {}
        ready: deque[_Job] = deque()
        delayed: list[tuple[float, int, _Job]] = []  # heap of (when, seq, job) awaiting retry
        inflight: dict[Any, _Job] = {}
        done: queue.Queue[Any] = queue.Queue()
        seq = itertools.count()
        exhausted = False

        def finish(job: _Job, results: list[ImageResult]) -> None:
            parts[job.start] = results
            if progress is not None:
                progress(len(results))

        try:
            while True:
                now = time.monotonic()
                while delayed and delayed[0][0] <= now:
                    ready.append(heapq.heappop(delayed)[2])
                # A job waiting to retry keeps its slot: an overloaded server should not
                # receive new work while the old work backs off.
                while len(inflight) + len(delayed) < self.max_in_flight:
                    if ready:
                        job = ready.popleft()
                    elif not exhausted:
                        # Inputs are converted (files read) only when a slot frees up.
                        next_job = next(jobs, None)
                        if next_job is None:
                            exhausted = True
                            continue
                        job = next_job
                    else:
                        break
                    future = self._stub.Embed.future(
                        _request(job, flip, detection), timeout=self.timeout
                    )
                    inflight[future] = job
                    future.add_done_callback(done.put)
                if not inflight:
                    if not delayed:
                        break
                    time.sleep(max(0.0, delayed[0][0] - time.monotonic()))
                    continue
                wait = max(0.0, delayed[0][0] - time.monotonic()) if delayed else None
                try:
                    future = done.get(timeout=wait)
                except queue.Empty:
                    continue
                job = inflight.pop(future)
                try:
                    resp = future.result()
                except grpc.RpcError as e:
                    code = e.code()
                    if code in retry._RETRYABLE and job.attempt < self.retries:
                        when = time.monotonic() + retry.backoff_delay(self.backoff, job.attempt)
                        job.attempt += 1
                        heapq.heappush(delayed, (when, next(seq), job))
                    elif code == grpc.StatusCode.INVALID_ARGUMENT:
                        finish(job, _recover(job, e))
                    else:
                        raise from_rpc_error(e) from None
                else:
                    finish(job, _parse_response(resp, job))
        except BaseException:
            for future in inflight:
                future.cancel()
            raise
        return parts
