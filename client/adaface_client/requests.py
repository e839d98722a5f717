"""Requests: chunking prepared inputs into jobs, the request builders shared by the sync and
asyncio clients, and turning replies into ImageResults."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np

from adaface.v1 import common_pb2, embedder_pb2
from adaface_client.errors import ImageErrors, Internal, from_rpc_error
from adaface_client.options import DetectionOptions
from adaface_client.results import DetectedFace, DetectResult, ImageResult, ServerInfo, _reason_name

# Keeps each request well under the server's default 64 MiB message limit; an image larger
# than this still goes, alone.
_MAX_REQUEST_BYTES = 32 * 1024 * 1024
_FALLBACK_MAX_IMAGES = 32


@dataclass
class _Job:
    """A slice of the input sent as one EmbedRequest."""

    start: int
    inputs: list[common_pb2.ImageInput]
    attempt: int = 0


#: Trailing metadata in which the server returns the per-image results of a request whose
#: every image failed (the status itself is INVALID_ARGUMENT).
FAILED_RESPONSE_KEY = "adaface-embed-response-bin"


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


def _max_images(info: ServerInfo, batch_size: int | None) -> int:
    limit = info.max_images_per_request or _FALLBACK_MAX_IMAGES
    return max(1, min(limit, batch_size)) if batch_size else limit


def _request(
    job: _Job, flip: bool, detection: DetectionOptions | None = None
) -> embedder_pb2.EmbedRequest:
    return embedder_pb2.EmbedRequest(
        request_id=uuid.uuid4().hex, images=job.inputs, options=_embed_options(flip, detection)
    )


def _embed_options(flip: bool, detection: DetectionOptions | None) -> embedder_pb2.EmbedOptions:
    """The options every image-taking RPC shares (Embed and the gallery's)."""
    options = embedder_pb2.EmbedOptions(flip_fusion=flip)
    if detection is not None:
        options.detection.CopyFrom(detection.to_proto())
    return options


def _finish_embed(results: list[ImageResult], dim: int) -> tuple[np.ndarray, np.ndarray]:
    embeddings, norms = _to_arrays(results, dim)
    if any(not r.ok for r in results):
        raise ImageErrors(results, embeddings, norms)
    return embeddings, norms


def _detect_request(job: _Job, options: common_pb2.DetectOptions) -> embedder_pb2.DetectRequest:
    return embedder_pb2.DetectRequest(
        request_id=uuid.uuid4().hex, images=job.inputs, options=options
    )


def _parse_detect(resp: embedder_pb2.DetectResponse, job: _Job) -> list[DetectResult]:
    return [
        DetectResult(
            index=job.start + r.index,
            faces=tuple(DetectedFace.from_proto(f) for f in r.faces),
            reason=_reason_name(r.error.reason) if r.HasField("error") else None,
            message=r.error.message,
        )
        for r in resp.results
    ]
