"""Maps service errors to gRPC status codes; unexpected exceptions become INTERNAL."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from ..errors import ServiceError

log = logging.getLogger(__name__)

R = TypeVar("R")


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


def unary_errors(
    method: Callable[..., Awaitable[R]],
) -> Callable[..., Awaitable[R]]:
    """Turns ServiceError into its status and anything else into a logged INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            # Errors may carry structured details (e.g. per-image results) for the caller.
            # abort() replaces trailing metadata already set (the request id): keep it.
            trailing = tuple(getattr(exc, "trailing_metadata", ()))
            if trailing:
                trailing = tuple(context.trailing_metadata() or ()) + trailing
            await context.abort(
                status_code(exc), clip_details(str(exc)), trailing_metadata=trailing
            )
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper
