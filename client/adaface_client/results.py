"""What the Embedder service answers, as plain dataclasses: results, faces, server info."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adaface.v1 import common_pb2, embedder_pb2

__all__ = ["DetectResult", "DetectedFace", "ImageResult", "ServerInfo"]


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


def _enum_name(enum: Any, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        # A newer server may send values this client's stubs do not know yet.
        return str(value)


def _reason_name(value: int) -> str:
    return _enum_name(common_pb2.ImageError.Reason, value).removeprefix("REASON_")
