"""Service errors as HTTP statuses: the gRPC status name each error carries, mapped once.

The table is the usual gRPC-to-HTTP mapping (as grpc-gateway and Google APIs use), so a
client sees the same status name and message on either transport.
"""

from __future__ import annotations

HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


def http_status(code: str) -> int:
    """The HTTP status for a gRPC status name (500 for a name it does not know)."""
    return HTTP_STATUS.get(code, 500)
