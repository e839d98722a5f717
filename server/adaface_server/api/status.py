"""Service errors as gRPC statuses: the code each maps to, and a message short enough to send.

The interceptor (api/interceptor.py) applies them to every RPC."""

from __future__ import annotations

import grpc

from ..errors import ServiceError

#: Status messages travel in a header (grpc-message, percent-encoded); a long echo of some
#: input could push it past the metadata limit and turn the answer into RESOURCE_EXHAUSTED.
MAX_DETAILS_BYTES = 1000


def status_code(error: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


def clip_details(text: str) -> str:
    """`text`, cut to MAX_DETAILS_BYTES of UTF-8 (on a character boundary) with a marker."""
    data = text.encode()
    if len(data) <= MAX_DETAILS_BYTES:
        return text
    return data[: MAX_DETAILS_BYTES - 20].decode(errors="ignore") + " ...(cut)"
