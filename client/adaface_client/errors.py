"""Typed errors: an AdafaceError subclass per gRPC status; ImageErrors for failed images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from adaface_client.transport import request_id_of

if TYPE_CHECKING:
    import numpy as np

    from adaface_client.results import ImageResult

__all__ = [
    "AdafaceError",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "ImageErrors",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]


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


class Cancelled(AdafaceError):
    """The call was cancelled, or its upload ended before its content said it was complete
    (an import file without its end record): nothing was written."""


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
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(error: grpc.RpcError) -> AdafaceError:
    """The typed AdafaceError for a grpc.RpcError (sync or aio); unknown codes give the base.

    Its request_id is the x-request-id of the error's trailing metadata."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else None
    return _ERROR_BY_CODE.get(code, AdafaceError)(code, details or "", request_id_of(error))


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
