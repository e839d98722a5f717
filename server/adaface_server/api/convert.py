"""Protobuf <-> domain conversion for the Embedder service, with field-level validation."""

from __future__ import annotations

import math
import uuid

import numpy as np

from adaface.v1 import common_pb2, embedder_pb2

from ..embedding import ImageOutcome, ModelInfo
from ..errors import InvalidArgument
from ..preprocess.pipeline import AlignMode, ImageItem

MAX_REQUEST_ID = 128
MAX_SIDE = 65535

_MODES = {
    common_pb2.ALIGNMENT_ALIGNED: AlignMode.ALIGNED,
    common_pb2.ALIGNMENT_LANDMARKS: AlignMode.LANDMARKS,
    common_pb2.ALIGNMENT_DETECT: AlignMode.DETECT,
}


def request_id(given: str) -> str:
    if len(given) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id: at most {MAX_REQUEST_ID} characters, got {len(given)}")
    return given or uuid.uuid4().hex


def image_item(image: common_pb2.ImageInput, field: str) -> ImageItem:
    """Validates one ImageInput; `field` is its path in the request, e.g. ``images[3]``."""
    landmarks = list(image.landmarks)
    mode = image.alignment
    if mode == common_pb2.ALIGNMENT_UNSPECIFIED:
        mode = common_pb2.ALIGNMENT_LANDMARKS if landmarks else common_pb2.ALIGNMENT_ALIGNED
    if mode not in _MODES:
        raise InvalidArgument(f"{field}.alignment: unknown value {mode}")
    align = _MODES[mode]

    points = None
    if align is AlignMode.LANDMARKS:
        if len(landmarks) != 10:
            raise InvalidArgument(f"{field}.landmarks: need 10 values, got {len(landmarks)}")
        if not all(math.isfinite(v) for v in landmarks):
            raise InvalidArgument(f"{field}.landmarks: values must be finite, got {landmarks}")
        points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    elif landmarks:
        name = common_pb2.Alignment.Name(mode)
        raise InvalidArgument(
            f"{field}.landmarks: must be empty for {name}, got {len(landmarks)} values"
        )

    source = image.WhichOneof("source")
    if source == "encoded":
        return ImageItem(encoded=image.encoded, mode=align, landmarks=points)
    if source == "raw":
        raw = image.raw
        for side in ("height", "width"):
            value = getattr(raw, side)
            if not 1 <= value <= MAX_SIDE:
                raise InvalidArgument(f"{field}.raw.{side}: must be 1..{MAX_SIDE}, got {value}")
        need = raw.height * raw.width * 3
        if len(raw.data) != need:
            raise InvalidArgument(
                f"{field}.raw.data: need {raw.height}*{raw.width}*3 = {need} bytes of RGB, "
                f"got {len(raw.data)}"
            )
        return ImageItem(raw=(raw.height, raw.width, raw.data), mode=align, landmarks=points)
    raise InvalidArgument(f"{field}: set either encoded or raw")


def image_items(request: embedder_pb2.EmbedRequest) -> list[ImageItem]:
    return [image_item(img, f"images[{i}]") for i, img in enumerate(request.images)]


def embed_response(
    rid: str, outcomes: list[ImageOutcome], model_name: str
) -> embedder_pb2.EmbedResponse:
    response = embedder_pb2.EmbedResponse(request_id=rid, model_name=model_name)
    for i, outcome in enumerate(outcomes):
        result = response.results.add(index=i)
        if outcome.ok:
            vector = np.asarray(outcome.embedding, dtype="<f4")
            result.embedding.vector = vector.tobytes()
            result.embedding.dim = vector.size
            result.embedding.norm = outcome.norm
        else:
            result.error.reason = common_pb2.ImageError.Reason.Value(
                "REASON_" + (outcome.error_reason or "UNSPECIFIED")
            )
            result.error.message = outcome.error_message
    return response


def all_failed_message(outcomes: list[ImageOutcome]) -> str:
    shown = "; ".join(o.error_message for o in outcomes[:5])
    more = f"; and {len(outcomes) - 5} more" if len(outcomes) > 5 else ""
    return f"every image failed: {shown}{more}"


def info_response(info: ModelInfo, settings) -> embedder_pb2.InfoResponse:
    return embedder_pb2.InfoResponse(
        model_name=info.model_name,
        arch=info.arch,
        embedding_dim=info.embedding_dim,
        max_batch_size=info.max_batch_size,
        max_images_per_request=settings.max_images_per_request,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        backend=info.backend,
        model_checksum=info.model_checksum,
        server_version=info.server_version,
        untrained=info.untrained,
        weights=info.weights,
        alignments=[common_pb2.ALIGNMENT_ALIGNED, common_pb2.ALIGNMENT_LANDMARKS],
    )
