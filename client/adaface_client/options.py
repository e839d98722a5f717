"""Client options: server-side detection options, channel options and argument checks."""

from __future__ import annotations

from dataclasses import dataclass

from adaface.v1 import common_pb2

__all__ = ["DetectionOptions"]

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


def _check_args(timeout: float, max_in_flight: int, retries: int, backoff: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if backoff < 0:
        raise ValueError(f"backoff must be >= 0, got {backoff}")
