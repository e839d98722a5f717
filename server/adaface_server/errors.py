"""Service errors: one hierarchy, each class naming the gRPC status it maps to."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client may see; `status` is a grpc.StatusCode member name."""

    status = "INTERNAL"


class InvalidArgument(ServiceError):
    status = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    status = "NOT_FOUND"


class AlreadyExists(ServiceError):
    status = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    status = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    status = "UNAVAILABLE"


class Unimplemented(ServiceError):
    status = "UNIMPLEMENTED"


class Unauthenticated(ServiceError):
    status = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    status = "PERMISSION_DENIED"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    """The request ended before its own content said it was complete (an upload without its
    end record): nothing was done, as for a call the client cancelled."""

    status = "CANCELLED"


class Internal(ServiceError):
    status = "INTERNAL"


class StartupError(Exception):
    """The server cannot start (e.g. missing model files); the message says how to fix it."""
