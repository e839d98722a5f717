"""Protobuf <-> domain conversion for the Embedder service, with field-level validation."""

from __future__ import annotations

import math
import uuid

import numpy as np

from adaface.v1 import common_pb2, embedder_pb2

from ..embedding import FaceOutcome, ImageOutcome, ModelInfo
from ..errors import InvalidArgument
from ..preprocess.align import AlignMethod
from ..preprocess.detect import MIN_FACE_SIZE, THRESHOLDS, DetectParams, Selection
from ..preprocess.pipeline import AlignMode, ImageItem

MAX_REQUEST_ID = 128
MAX_SIDE = 65535
MIN_FACE_RANGE = (12.0, 10000.0)

_SELECTIONS = {
    common_pb2.FACE_SELECTION_UNSPECIFIED: Selection.BEST,
    common_pb2.FACE_SELECTION_BEST: Selection.BEST,
    common_pb2.FACE_SELECTION_LARGEST: Selection.LARGEST,
    common_pb2.FACE_SELECTION_ALL: Selection.ALL,
}
_ALIGN_METHODS = {
    common_pb2.ALIGN_METHOD_UNSPECIFIED: AlignMethod.ADAFACE,
    common_pb2.ALIGN_METHOD_ADAFACE: AlignMethod.ADAFACE,
    common_pb2.ALIGN_METHOD_INSIGHTFACE: AlignMethod.INSIGHTFACE,
}

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


def detect_items(request: embedder_pb2.DetectRequest) -> list[ImageItem]:
    """Detect ignores `alignment`: every image is detected."""
    items = []
    for i, img in enumerate(request.images):
        if img.landmarks:
            raise InvalidArgument(
                f"images[{i}].landmarks: must be empty for Detect, got {len(img.landmarks)} values"
            )
        probe = common_pb2.ImageInput()
        probe.CopyFrom(img)
        probe.alignment = common_pb2.ALIGNMENT_DETECT
        items.append(image_item(probe, f"images[{i}]"))
    return items


def detect_params(options: common_pb2.DetectOptions, field: str) -> DetectParams:
    """Validates DetectOptions; zero values mean AdaFace's defaults."""
    if options.selection not in _SELECTIONS:
        raise InvalidArgument(f"{field}.selection: unknown value {options.selection}")
    if options.align_method not in _ALIGN_METHODS:
        raise InvalidArgument(f"{field}.align_method: unknown value {options.align_method}")
    min_face = options.min_face_size or MIN_FACE_SIZE
    low, high = MIN_FACE_RANGE
    if not (math.isfinite(min_face) and low <= min_face <= high):
        raise InvalidArgument(
            f"{field}.min_face_size: must be 0 (default {MIN_FACE_SIZE:g}) or "
            f"{low:g}..{high:g} pixels, got {options.min_face_size:g}"
        )
    min_score = options.min_score or THRESHOLDS[2]
    if not (math.isfinite(min_score) and 0.0 < min_score < 1.0):
        raise InvalidArgument(
            f"{field}.min_score: must be 0 (default {THRESHOLDS[2]:g}) or in (0, 1), "
            f"got {options.min_score:g}"
        )
    return DetectParams(
        selection=_SELECTIONS[options.selection],
        min_face_size=float(min_face),
        min_score=float(min_score),
        return_aligned=options.return_aligned,
        upstream_softmax=options.upstream_softmax,
        align_method=_ALIGN_METHODS[options.align_method],
    )


def _fill_face(msg: common_pb2.DetectedFace, face: FaceOutcome) -> None:
    msg.box.extend(float(v) for v in face.face.box)
    msg.score = face.face.score
    msg.landmarks.extend(float(v) for v in face.face.landmarks.reshape(-1))
    if face.embedding is not None:
        _fill_embedding(msg.embedding, face.embedding, face.norm)
    msg.aligned_png = face.aligned_png


def _fill_embedding(msg: common_pb2.Embedding, embedding: np.ndarray, norm: float) -> None:
    vector = np.asarray(embedding, dtype="<f4")
    msg.vector = vector.tobytes()
    msg.dim = vector.size
    msg.norm = norm


def _fill_error(msg: common_pb2.ImageError, outcome: ImageOutcome) -> None:
    msg.reason = common_pb2.ImageError.Reason.Value(
        "REASON_" + (outcome.error_reason or "UNSPECIFIED")
    )
    msg.message = outcome.error_message


def detect_response(rid: str, outcomes: list[ImageOutcome]) -> embedder_pb2.DetectResponse:
    response = embedder_pb2.DetectResponse(request_id=rid)
    for i, outcome in enumerate(outcomes):
        result = response.results.add(index=i)
        if outcome.error_reason is not None:
            _fill_error(result.error, outcome)
        for face in outcome.faces:
            _fill_face(result.faces.add(), face)
    return response


def embed_response(
    rid: str, outcomes: list[ImageOutcome], model_name: str
) -> embedder_pb2.EmbedResponse:
    response = embedder_pb2.EmbedResponse(request_id=rid, model_name=model_name)
    for i, outcome in enumerate(outcomes):
        result = response.results.add(index=i)
        if outcome.ok:
            _fill_embedding(result.embedding, outcome.embedding, outcome.norm)
            for face in outcome.faces:
                _fill_face(result.faces.add(), face)
        else:
            _fill_error(result.error, outcome)
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
        device=info.device,
        precision=info.precision,
        worker_pid=info.worker_pid,
        channel_order=info.channel_order,
        alignments=[common_pb2.ALIGNMENT_ALIGNED, common_pb2.ALIGNMENT_LANDMARKS]
        + ([common_pb2.ALIGNMENT_DETECT] if settings.detector != "none" else []),
    )
