"""Synchronous and asyncio clients for the adaface.v1 Embedder service (no torch needed)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import queue
import random
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import grpc
import numpy as np

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from adaface_client.transport import open_aio_channel, open_channel, request_id_of

__all__ = [
    "AdafaceError",
    "AsyncClient",
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

# What `images` may hold: a file path, encoded bytes, a PIL image, an HxWx3 uint8 RGB array,
# or a ready ImageInput message (sent unchanged).
ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Any]  # noqa: UP007
LandmarksLike = Union[Sequence[float], np.ndarray, None]  # noqa: UP007
AlignmentLike = Union[int, str, None]  # noqa: UP007

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Keeps each request well under the server's default 64 MiB message limit; an image larger
# than this still goes, alone.
_MAX_REQUEST_BYTES = 32 * 1024 * 1024
_MAX_BACKOFF_S = 10.0
_FALLBACK_MAX_IMAGES = 32
_CHANNEL_OPTIONS = (
    # The client never limits what it sends or receives; the server enforces its own limits.
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # gRPC's default first reconnect waits 1 s, longer than our first retries: a restarted
    # server would otherwise see every retry fail fast on a channel still backing off.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


# --------------------------------------------------------------------------------------
# Errors


class AdafaceError(Exception):
    """An RPC failed as a whole; `code` is the grpc.StatusCode, `details` the server's text,
    `request_id` the server's x-request-id for the call ('' when none came back): quote it
    when reporting a problem, the server's log lines carry it too."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str = "") -> None:
        message = f"{code.name}: {details}"
        if request_id:
            message += f" (request id {request_id})"
        super().__init__(message)
        self.code = code
        self.details = details
        self.request_id = request_id


class InvalidArgument(AdafaceError):
    """The request was malformed, or every image of it failed."""


class NotFound(AdafaceError):
    """An unknown gallery, identity or model."""


class AlreadyExists(AdafaceError):
    """A gallery or identity with that name exists already."""


class FailedPrecondition(AdafaceError):
    """The server's state forbids the call (e.g. a gallery built by another model)."""


class ResourceExhausted(AdafaceError):
    """The server is overloaded (retried before it reaches you)."""


class Unavailable(AdafaceError):
    """The server cannot be reached or is not ready (retried before it reaches you)."""


class Unauthenticated(AdafaceError):
    """Missing or invalid credentials."""


class PermissionDenied(AdafaceError):
    """The credentials do not allow this call."""


class Internal(AdafaceError):
    """The server failed unexpectedly, or its reply broke the protocol."""


class DeadlineExceeded(AdafaceError):
    """The call did not finish within the client's timeout."""


class Unimplemented(AdafaceError):
    """The server does not implement this call."""


_ERROR_BY_CODE: dict[grpc.StatusCode, type[AdafaceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def from_rpc_error(error: grpc.RpcError) -> AdafaceError:
    """The typed AdafaceError for a grpc.RpcError (sync or aio); unknown codes give the base.

    Its request_id is the x-request-id of the error's trailing metadata."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else None
    return _ERROR_BY_CODE.get(code, AdafaceError)(code, details or "", request_id_of(error))


# --------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class DetectionOptions:
    """Server-side face detection options (ALIGNMENT_DETECT images and Client.detect).

    selection: "best" (highest score, AdaFace's choice), "largest" or "all";
    min_face_size in pixels and min_score in (0, 1) (0 = the server's defaults, 20 and 0.9);
    return_aligned: also return each aligned 112x112 crop as PNG bytes;
    upstream_softmax: reproduce AdaFace's P-Net softmax bug for exact parity;
    align_method: "adaface" (AdaFace's own alignment) or "insightface" (norm_crop's Umeyama
    fit onto arcface_dst).
    """

    selection: str = "best"
    min_face_size: float = 0.0
    min_score: float = 0.0
    return_aligned: bool = False
    upstream_softmax: bool = False
    align_method: str = "adaface"

    def to_proto(self) -> common_pb2.DetectOptions:
        try:
            selection = common_pb2.FaceSelection.Value("FACE_SELECTION_" + self.selection.upper())
        except ValueError:
            raise ValueError(
                f"selection must be best, largest or all, got {self.selection!r}"
            ) from None
        try:
            method = common_pb2.AlignMethod.Value("ALIGN_METHOD_" + self.align_method.upper())
        except ValueError:
            raise ValueError(
                f"align_method must be adaface or insightface, got {self.align_method!r}"
            ) from None
        return common_pb2.DetectOptions(
            selection=selection,
            min_face_size=self.min_face_size,
            min_score=self.min_score,
            return_aligned=self.return_aligned,
            upstream_softmax=self.upstream_softmax,
            align_method=method,
        )


@dataclass(frozen=True)
class DetectedFace:
    """A face found by the server: box (x1, y1, x2, y2), score, landmarks (5, 2) (x, y);
    embedding/norm with Embed, aligned_png when requested."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    embedding: np.ndarray | None = field(default=None, repr=False)
    norm: float | None = None
    aligned_png: bytes = field(default=b"", repr=False)

    @classmethod
    def from_proto(cls, msg: common_pb2.DetectedFace) -> DetectedFace:
        embedding = None
        if msg.HasField("embedding"):
            embedding = np.frombuffer(msg.embedding.vector, dtype="<f4").astype(np.float32)
        return cls(
            box=np.asarray(msg.box, dtype=np.float32),
            score=float(msg.score),
            landmarks=np.asarray(msg.landmarks, dtype=np.float32).reshape(-1, 2),
            embedding=embedding,
            norm=float(msg.embedding.norm) if embedding is not None else None,
            aligned_png=msg.aligned_png,
        )


@dataclass(frozen=True)
class DetectResult:
    """Client.detect's answer for one image: its faces, or why there are none."""

    index: int
    faces: tuple[DetectedFace, ...] = ()
    reason: str | None = None
    message: str = ""


@dataclass(frozen=True)
class ServerInfo:
    """What Embedder.Info reports: the served model and the server's limits."""

    model_name: str
    arch: str
    embedding_dim: int
    max_batch_size: int
    max_images_per_request: int
    max_image_bytes: int
    max_image_pixels: int
    backend: str
    model_checksum: str
    server_version: str
    untrained: bool
    weights: str
    alignments: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: embedder_pb2.InfoResponse) -> ServerInfo:
        return cls(
            model_name=msg.model_name,
            arch=msg.arch,
            embedding_dim=msg.embedding_dim,
            max_batch_size=msg.max_batch_size,
            max_images_per_request=msg.max_images_per_request,
            max_image_bytes=msg.max_image_bytes,
            max_image_pixels=msg.max_image_pixels,
            backend=msg.backend,
            model_checksum=msg.model_checksum,
            server_version=msg.server_version,
            untrained=msg.untrained,
            weights=msg.weights,
            alignments=tuple(_enum_name(common_pb2.Alignment, a) for a in msg.alignments),
        )


@dataclass(frozen=True)
class ImageResult:
    """The outcome for one input image: an embedding and norm, or an error reason/message.

    `reason` is the ImageError.Reason name without its prefix (e.g. "UNDECODABLE").
    """

    index: int
    embedding: np.ndarray | None = field(default=None, repr=False)
    norm: float | None = None
    reason: str | None = None
    message: str = ""
    faces: tuple[DetectedFace, ...] = ()  # ALIGNMENT_DETECT: every selected face

    @property
    def ok(self) -> bool:
        return self.embedding is not None


class ImageErrors(Exception):
    """Some images produced no embedding. `errors` lists (index, reason, message) for each;
    `results` holds every ImageResult; `embeddings`/`norms` are the partial [N,D]/[N,1]
    arrays with NaN rows where an image failed."""

    def __init__(
        self, results: list[ImageResult], embeddings: np.ndarray, norms: np.ndarray
    ) -> None:
        self.results = results
        self.embeddings = embeddings
        self.norms = norms
        self.errors: list[tuple[int, str, str]] = [
            (r.index, r.reason or "UNSPECIFIED", r.message) for r in results if not r.ok
        ]
        shown = "; ".join(f"[{i}] {reason}: {msg}" for i, reason, msg in self.errors[:5])
        more = f"; ... {len(self.errors) - 5} more" if len(self.errors) > 5 else ""
        super().__init__(f"{len(self.errors)} of {len(results)} images failed: {shown}{more}")


def _enum_name(enum: Any, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        # A newer server may send values this client's stubs do not know yet.
        return str(value)


def _reason_name(value: int) -> str:
    return _enum_name(common_pb2.ImageError.Reason, value).removeprefix("REASON_")


# --------------------------------------------------------------------------------------
# Input conversion


_ALIGNMENT_ALIASES = {
    "unspecified": common_pb2.ALIGNMENT_UNSPECIFIED,
    "aligned": common_pb2.ALIGNMENT_ALIGNED,
    "landmarks": common_pb2.ALIGNMENT_LANDMARKS,
    "detect": common_pb2.ALIGNMENT_DETECT,
}
_MAX_SIDE = 65535


def _parse_alignment(alignment: AlignmentLike) -> int | None:
    if alignment is None:
        return None
    if isinstance(alignment, str):
        key = alignment.lower().removeprefix("alignment_")
        if key not in _ALIGNMENT_ALIASES:
            raise ValueError(
                f"unknown alignment {alignment!r}; use one of {sorted(_ALIGNMENT_ALIASES)}"
            )
        return _ALIGNMENT_ALIASES[key]
    if isinstance(alignment, bool) or not isinstance(alignment, (int, np.integer)):
        raise TypeError(f"alignment must be a str or an Alignment value, got {type(alignment)}")
    if int(alignment) not in common_pb2.Alignment.values():
        raise ValueError(f"unknown alignment value {int(alignment)}")
    return int(alignment)


def _parse_landmarks(landmarks: LandmarksLike) -> list[float] | None:
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, bytes)):
        raise TypeError("landmarks must be 10 numbers or a (5, 2) array, got a string")
    try:
        arr = np.asarray(landmarks, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"landmarks must be 10 numbers or a (5, 2) array: {e}") from None
    if arr.shape not in ((10,), (5, 2)):
        raise ValueError(
            "landmarks must be 10 numbers (x1,y1,...,x5,y5) or a (5, 2) array, "
            f"got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("landmarks must be finite numbers")
    return arr.reshape(10).tolist()


def _is_pil_image(image: object) -> bool:
    # Only an imported PIL can have made a PIL image: no import needed to check.
    pil_image = sys.modules.get("PIL.Image")
    return pil_image is not None and isinstance(image, pil_image.Image)


def _check_image(image: object, what: str) -> None:
    """Type, shape and size checks that need no file reads and no pixel copies."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"{what} must have dtype uint8 (RGB 0..255), got {image.dtype}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what} must be an HxWx3 RGB array, got shape {image.shape}")
        height, width = image.shape[:2]
    elif _is_pil_image(image):
        width, height = image.size  # type: ignore[attr-defined]
    else:
        raise TypeError(
            f"{what}: unsupported image type {type(image).__name__}: pass a file path, "
            "encoded bytes, a PIL.Image.Image, an HxWx3 uint8 RGB numpy array, "
            "or an adaface.v1 ImageInput"
        )
    if not (1 <= height <= _MAX_SIDE and 1 <= width <= _MAX_SIDE):
        raise ValueError(f"{what} must be 1..{_MAX_SIDE} pixels on each side, got {width}x{height}")


def _alignment_and_points(
    landmarks: LandmarksLike, alignment: AlignmentLike
) -> tuple[int, list[float] | None]:
    points = _parse_landmarks(landmarks)
    mode = _parse_alignment(alignment)
    if mode is None:
        mode = (
            common_pb2.ALIGNMENT_LANDMARKS if points is not None else common_pb2.ALIGNMENT_ALIGNED
        )
    if mode == common_pb2.ALIGNMENT_LANDMARKS and points is None:
        raise ValueError("alignment LANDMARKS needs landmarks for the image")
    if points is not None and mode not in (
        common_pb2.ALIGNMENT_LANDMARKS,
        common_pb2.ALIGNMENT_UNSPECIFIED,
    ):
        raise ValueError(
            f"landmarks were given but alignment is {common_pb2.Alignment.Name(mode)}; "
            "landmarks are only used with ALIGNMENT_LANDMARKS"
        )
    return mode, points


def make_image_input(
    image: ImageLike, *, landmarks: LandmarksLike = None, alignment: AlignmentLike = None
) -> common_pb2.ImageInput:
    """Convert one image (path, encoded bytes, PIL image, HxWx3 uint8 RGB array) to ImageInput.

    Paths are read and sent as-is; PIL images and arrays go as exact RGB pixels. Alignment
    defaults to LANDMARKS when landmarks are given, ALIGNED otherwise. Raises TypeError for
    an unsupported type, ValueError for a bad shape, size or combination.
    """
    if isinstance(image, common_pb2.ImageInput):
        raise TypeError(
            "an ImageInput message is sent as given; pass it straight to embed()/embed_results()"
        )
    _check_image(image, "image")
    mode, points = _alignment_and_points(landmarks, alignment)
    msg = common_pb2.ImageInput(alignment=mode, landmarks=points or ())
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            msg.encoded = f.read()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        msg.encoded = bytes(image)
    else:
        # Raw pixels, not a re-encode: exact, and cheaper than PNG encoding on the client.
        if _is_pil_image(image) and image.mode != "RGB":  # type: ignore[union-attr]
            image = image.convert("RGB")  # type: ignore[union-attr]
        pixels = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
        height, width = pixels.shape[:2]
        msg.raw.CopyFrom(common_pb2.RawImage(height=height, width=width, data=pixels.tobytes()))
    return msg


@dataclass
class _Job:
    """A slice of the input sent as one EmbedRequest."""

    start: int
    inputs: list[common_pb2.ImageInput]
    attempt: int = 0


#: Trailing metadata in which the server returns the per-image results of a request whose
#: every image failed (the status itself is INVALID_ARGUMENT).
FAILED_RESPONSE_KEY = "adaface-embed-response-bin"


def _prepared(
    images: Iterable[ImageLike], landmarks: Iterable[LandmarksLike] | None, alignment: Any
) -> Iterator[common_pb2.ImageInput]:
    """Validates what it can up front, then converts lazily so files are read only as
    requests go out. Caller-built ImageInput messages pass unchanged."""
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or _is_pil_image(images):
        raise TypeError("images must be a sequence of images (wrap a single image in a list)")
    sized = isinstance(images, Sequence)
    if isinstance(alignment, (str, int, np.integer)) or alignment is None:
        alignments: Iterable[Any] = itertools.repeat(alignment)
    else:
        alignments = alignment
        if sized and isinstance(alignment, Sequence) and len(alignment) != len(images):
            raise ValueError(f"alignment has {len(alignment)} entries for {len(images)} images")
    if landmarks is None:
        marks: Iterable[Any] = itertools.repeat(None)
    else:
        marks = landmarks
        if sized and isinstance(landmarks, Sequence) and len(landmarks) != len(images):
            raise ValueError(f"landmarks has {len(landmarks)} entries for {len(images)} images")
    items = _zip_exact(images, marks, alignments)
    if sized:
        # Catch a bad input before any request goes out, not after half the work is done.
        items = list(items)
        for i, (image, lm, mode) in enumerate(items):
            _check_item(i, image, lm, mode)
    for i, (image, lm, mode) in enumerate(items):
        if isinstance(image, common_pb2.ImageInput):
            _check_item(i, image, lm, mode)
            yield image
            continue
        try:
            yield make_image_input(image, landmarks=lm, alignment=mode)
        except (TypeError, ValueError) as e:
            raise type(e)(f"images[{i}]: {e}") from None


def _zip_exact(
    images: Iterable[Any], marks: Iterable[Any], alignments: Iterable[Any]
) -> Iterator[tuple[Any, Any, Any]]:
    sentinel = object()
    mark_it, align_it = iter(marks), iter(alignments)
    for i, image in enumerate(images):
        lm, mode = next(mark_it, sentinel), next(align_it, sentinel)
        if lm is sentinel:
            raise ValueError(f"landmarks ran out at image {i}")
        if mode is sentinel:
            raise ValueError(f"alignment ran out at image {i}")
        yield image, lm, mode


def _check_item(i: int, image: Any, lm: Any, mode: Any) -> None:
    if isinstance(image, common_pb2.ImageInput):
        if lm is not None:
            raise ValueError(
                f"images[{i}] is an ImageInput message: set its landmarks field instead"
            )
        return
    try:
        _check_image(image, "image")
        _alignment_and_points(lm, mode)
    except (TypeError, ValueError) as e:
        raise type(e)(f"images[{i}]: {e}") from None


def _jobs(prepared: Iterator[common_pb2.ImageInput], max_images: int) -> Iterator[_Job]:
    start, inputs, size = 0, [], 0
    for msg in prepared:
        nbytes = msg.ByteSize()
        if inputs and (len(inputs) >= max_images or size + nbytes > _MAX_REQUEST_BYTES):
            yield _Job(start, inputs)
            start, inputs, size = start + len(inputs), [], 0
        inputs.append(msg)
        size += nbytes
    if inputs:
        yield _Job(start, inputs)


def _parse_response(resp: embedder_pb2.EmbedResponse, job: _Job) -> list[ImageResult]:
    sent = len(job.inputs)
    if len(resp.results) != sent:
        raise Internal(
            grpc.StatusCode.INTERNAL,
            f"server returned {len(resp.results)} results for {sent} images",
        )
    out: list[ImageResult | None] = [None] * len(job.inputs)
    for r in resp.results:
        if r.index >= len(out) or out[r.index] is not None:
            raise Internal(grpc.StatusCode.INTERNAL, f"server returned a bad index {r.index}")
        index = job.start + r.index
        if r.HasField("error") or not r.HasField("embedding"):
            reason = _reason_name(r.error.reason) if r.HasField("error") else "UNSPECIFIED"
            message = r.error.message or "the server returned no embedding"
            local = f"images[{r.index}]"
            if message.startswith(local):
                # The server counts within its request; callers count within their input.
                message = f"images[{index}]" + message[len(local) :]
            out[r.index] = ImageResult(index=index, reason=reason, message=message)
            continue
        vec = np.frombuffer(r.embedding.vector, dtype="<f4").astype(np.float32)
        if r.embedding.dim and vec.size != r.embedding.dim:
            raise Internal(
                grpc.StatusCode.INTERNAL,
                f"embedding of {vec.size} values but dim {r.embedding.dim}",
            )
        out[r.index] = ImageResult(
            index=index,
            embedding=vec,
            norm=float(r.embedding.norm),
            faces=tuple(DetectedFace.from_proto(f) for f in r.faces),
        )
    return out  # type: ignore[return-value]


def _recover(job: _Job, error: grpc.RpcError) -> list[ImageResult]:
    """INVALID_ARGUMENT: every image failed (per-image results ride in the trailing metadata)
    or the request is malformed (raised as InvalidArgument)."""
    for key, value in error.trailing_metadata() or ():
        if key == FAILED_RESPONSE_KEY:
            return _parse_response(embedder_pb2.EmbedResponse.FromString(value), job)
    raise from_rpc_error(error) from None


def _assemble(parts: dict[int, list[ImageResult]]) -> list[ImageResult]:
    return [r for start in sorted(parts) for r in parts[start]]


def _to_arrays(results: list[ImageResult], dim: int) -> tuple[np.ndarray, np.ndarray]:
    dims = {r.embedding.shape[0] for r in results if r.embedding is not None}
    if dims:
        dim = dims.pop()
    embeddings = np.full((len(results), dim), np.nan, dtype=np.float32)
    norms = np.full((len(results), 1), np.nan, dtype=np.float32)
    for i, r in enumerate(results):
        if r.embedding is not None:
            embeddings[i] = r.embedding
            norms[i, 0] = r.norm
    return embeddings, norms


def _backoff_delay(base: float, attempt: int) -> float:
    # Full-range jitter around the exponential step keeps many clients from retrying in step.
    return min(_MAX_BACKOFF_S, base * (2**attempt)) * random.uniform(0.5, 1.5)


def call_with_retries(
    method: Callable[..., Any], request: Any, timeout: float, retries: int, backoff: float
) -> Any:
    """A unary call retried with backoff on UNAVAILABLE / RESOURCE_EXHAUSTED; errors typed."""
    for attempt in itertools.count():
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in _RETRYABLE and attempt < retries:
                time.sleep(_backoff_delay(backoff, attempt))
                continue
            raise from_rpc_error(e) from None
    raise AssertionError("unreachable")


def _max_images(info: ServerInfo, batch_size: int | None) -> int:
    limit = info.max_images_per_request or _FALLBACK_MAX_IMAGES
    return max(1, min(limit, batch_size)) if batch_size else limit


def _request(
    job: _Job, flip: bool, detection: DetectionOptions | None = None
) -> embedder_pb2.EmbedRequest:
    options = embedder_pb2.EmbedOptions(flip_fusion=flip)
    if detection is not None:
        options.detection.CopyFrom(detection.to_proto())
    return embedder_pb2.EmbedRequest(
        request_id=uuid.uuid4().hex, images=job.inputs, options=options
    )


def _check_args(timeout: float, max_in_flight: int, retries: int, backoff: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if backoff < 0:
        raise ValueError(f"backoff must be >= 0, got {backoff}")


def _finish_embed(results: list[ImageResult], dim: int) -> tuple[np.ndarray, np.ndarray]:
    embeddings, norms = _to_arrays(results, dim)
    if any(not r.ok for r in results):
        raise ImageErrors(results, embeddings, norms)
    return embeddings, norms


# --------------------------------------------------------------------------------------
# Synchronous client


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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed images; returns (embeddings float32 [N,D], norms float32 [N,1]) in input order.

        Raises ImageErrors (with the partial results) when any image failed.
        """
        results = self.embed_results(images, alignment=alignment, landmarks=landmarks, flip=flip)
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
            request = embedder_pb2.DetectRequest(
                request_id=uuid.uuid4().hex, images=job.inputs, options=options
            )
            resp = self._call(self._stub.Detect, request)
            for r in resp.results:
                out.append(
                    DetectResult(
                        index=job.start + r.index,
                        faces=tuple(DetectedFace.from_proto(f) for f in r.faces),
                        reason=_reason_name(r.error.reason) if r.HasField("error") else None,
                        message=r.error.message,
                    )
                )
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
                    if code in _RETRYABLE and job.attempt < self.retries:
                        when = time.monotonic() + _backoff_delay(self.backoff, job.attempt)
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


# --------------------------------------------------------------------------------------
# asyncio client


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
                if e.code() in _RETRYABLE and attempt < self.retries:
                    await asyncio.sleep(_backoff_delay(self.backoff, attempt))
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

    async def embed(
        self,
        images: Iterable[ImageLike],
        *,
        alignment: AlignmentLike | Sequence[AlignmentLike] = None,
        landmarks: Iterable[LandmarksLike] | None = None,
        flip: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embed images; returns (embeddings float32 [N,D], norms float32 [N,1]) in input order.

        Raises ImageErrors (with the partial results) when any image failed.
        """
        results = await self.embed_results(
            images, alignment=alignment, landmarks=landmarks, flip=flip
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
    ) -> list[ImageResult]:
        """Embed images; one ImageResult per image in input order, failures included."""
        use_flip = self.flip if flip is None else flip
        prepared = _prepared(images, landmarks, alignment)
        info = await self._cached_info()
        jobs = _jobs(prepared, _max_images(info, self.batch_size))
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
        parts: dict[int, list[ImageResult]] = {}

        async def process(job: _Job) -> None:
            while True:
                try:
                    async with self._semaphore:  # type: ignore[union-attr]
                        resp = await self._stub.Embed(_request(job, use_flip), timeout=self.timeout)
                except grpc.RpcError as e:
                    code = e.code()
                    if code in _RETRYABLE and job.attempt < self.retries:
                        await asyncio.sleep(_backoff_delay(self.backoff, job.attempt))
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
