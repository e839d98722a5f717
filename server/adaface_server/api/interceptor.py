"""What every RPC goes through before and after its servicer: one server interceptor.

In order, for each call:
  1. a request id is taken from metadata `x-request-id` (or made up) and set as trailing
     metadata, so every answer, errors included, carries it;
  2. the bearer token is checked (when tokens are configured). Metadata arrives before the
     body, so a call without a valid token is refused before its body is read: the handler
     then takes the request as a stream it never reads, and gRPC holds no more of the body
     than its flow-control window;
  3. the request body is checked: over `max_message_bytes` or not a valid protobuf of the
     RPC's request type is INVALID_ARGUMENT naming the limit or the type, instead of gRPC's
     generic answers; a request stream longer than `max_stream_requests` is cut off likewise,
     and one that sends nothing for `stream_idle_seconds` while the server waits for it is
     ended with DEADLINE_EXCEEDED naming the setting;
  4. the servicer runs with the request id and deadline in context variables;
  5. the outcome is counted (Prometheus) and logged as one line.

Once the server is stopping (`refuse_new_calls`), every new call but a health check is
answered UNAVAILABLE before its body is read, while calls already running go on; `drained`
says when the last of them has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..config import Settings
from ..errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from ..logs import ACCESS_LOGGER
from ..metrics import Metrics
from ..request_context import Call, current_call
from ..security import Caller, Role, TokenSet
from .status import clip_details, status_code

log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
#: Calls that change a gallery: with admin tokens configured, only they may make them.
ADMIN_METHODS = frozenset(
    "/adaface.v1.Gallery/" + name
    for name in (
        "CreateGallery",
        "DeleteGallery",
        "Enroll",
        "EnrollStream",
        "RemoveSamples",
        "RemoveIdentity",
        "Import",
    )
)
# Fields whose length is "images" in the request log line.
#: grpc.aio ends a request stream the same way when the client half-closes it and when the
#: client's connection drops; for a dropped connection the cancellation follows within about a
#: millisecond (0.02-0.6 ms measured on a loaded 2-core machine). Waiting this long before the
#: servicer acts on the end of a stream lets that cancellation arrive first: a dead client's
#: upload is not committed and its call is logged CANCELLED, not OK.
STREAM_END_SETTLE_SECONDS = 0.02

_COUNTED_FIELDS = ("images", "samples", "probes")

SHUTTING_DOWN = "server is shutting down: retry the call on another replica"


class _Malformed:
    """Stands in for a request body that failed our checks; the behaviour reports it."""

    def __init__(self, message: str) -> None:
        self.message = message


@dataclass
class _Tally:
    images: int = 0
    messages: int = 0


def _count_images(message: Any) -> int:
    for name in _COUNTED_FIELDS:
        if name in message.DESCRIPTOR.fields_by_name:
            return len(getattr(message, name))
    return 0


def _request_id(metadata: tuple) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _bearer(metadata: tuple) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class RequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, settings: Settings, tokens: TokenSet, metrics: Metrics) -> None:
        self._settings = settings
        self.tokens = tokens  # replaced whole on reload (SIGHUP), never mutated
        self._metrics = metrics
        self.in_flight = 0
        self.completed = 0  # calls answered since start
        self._stopping = False
        self._working = 0  # calls in flight that are not health checks
        self._idle = asyncio.Event()
        self._idle.set()

    def refuse_new_calls(self) -> None:
        """From now on every new call but a health check is answered UNAVAILABLE (body
        unread, nothing done); calls already running go on."""
        self._stopping = True

    @property
    def idle(self) -> bool:
        """No call is being served, health checks aside."""
        return self._working == 0

    async def drained(self, timeout: float) -> bool:
        """Waits, at most `timeout` seconds, until no call but a health check is in flight."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method = details.method
        if self._refused(method, details.invocation_metadata):
            return self._refusal(handler, method)
        deserialize = self._deserializer(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method, False),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, request_stream=True),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, method, True),
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )

    def _refused(self, method: str, metadata: tuple | None) -> bool:
        try:
            self._caller(method, metadata)
        except ServiceError:
            return True
        return False

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A handler that answers the failed token check without reading the body: request
        streams are read on demand, so a unary method is served as one and never read."""
        never_read = _unread_body
        if handler.response_streaming:
            behaviour = handler.unary_stream or handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(behaviour, method, True),
                request_deserializer=never_read,
                response_serializer=handler.response_serializer,
            )
        behaviour = handler.unary_unary or handler.stream_unary
        return grpc.stream_unary_rpc_method_handler(
            self._unary(behaviour, method, request_stream=True),
            request_deserializer=never_read,
            response_serializer=handler.response_serializer,
        )

    # -- request bodies ----------------------------------------------------------------

    def _deserializer(self, inner: Callable[[bytes], Any] | None):
        if inner is None:
            return None
        limit = self._settings.max_message_bytes
        type_name = _request_type_name(inner)

        def deserialize(data: bytes) -> Any:
            if len(data) > limit:
                return _Malformed(
                    f"request is {len(data)} bytes, over the limit of {limit} "
                    "(max_message_bytes); split it into smaller requests"
                )
            try:
                return inner(data)
            except Exception as exc:  # DecodeError, or anything a broken body provokes
                return _Malformed(f"request is not a valid {type_name} message: {exc}")

        return deserialize

    async def _checked_stream(
        self, requests: AsyncIterator[Any], tally: _Tally
    ) -> AsyncIterator[Any]:
        limit = self._settings.max_stream_requests
        idle = self._settings.stream_idle_seconds
        stream = aiter(requests)
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives as the read completes, which is exactly what a
                # dropped connection does (end of stream and cancellation at once).
                async with asyncio.timeout(idle if idle > 0 else None):
                    request = await anext(stream)
            except StopAsyncIteration:
                await asyncio.sleep(STREAM_END_SETTLE_SECONDS)
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    f"stream message {tally.messages}: nothing arrived for {idle:g} s "
                    "(stream_idle_seconds); send messages sooner or half-close the stream"
                ) from None
            if isinstance(request, _Malformed):
                raise InvalidArgument(f"stream message {tally.messages}: {request.message}")
            tally.messages += 1
            if tally.messages > limit:
                raise InvalidArgument(
                    f"stream has more than {limit} requests (max_stream_requests); "
                    "open a new stream for the rest"
                )
            tally.images += _count_images(request)
            yield request

    # -- per-call set-up and accounting -------------------------------------------------

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> Call:
        metadata = context.invocation_metadata()
        call = Call(
            method=method,
            request_id=_request_id(metadata),
            started=time.monotonic(),
            deadline=_deadline(context),
        )
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        current_call.set(call)
        self.in_flight += 1
        if method not in HEALTH_METHODS:
            self._working += 1
            self._idle.clear()
        return call

    def _authorize(self, method: str, context: grpc.aio.ServicerContext, call: Call) -> None:
        call.caller = self._caller(method, context.invocation_metadata())

    def _caller(self, method: str, metadata: tuple | None) -> str | None:
        """The caller's name for a call that may go on; raises when the server is stopping
        or the call's token does not do."""
        if self._stopping and method not in HEALTH_METHODS:
            raise Unavailable(SHUTTING_DOWN)
        tokens = self.tokens
        if not tokens.enabled:
            return None
        if method in HEALTH_METHODS and self._settings.auth_health_open:
            return None
        token = _bearer(metadata)
        if not token:
            raise Unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'"
                if token is None
                else "malformed credentials: expected 'authorization: Bearer <token>'"
            )
        caller: Caller | None = tokens.check(token)
        if caller is None:
            raise Unauthenticated("invalid bearer token")
        if method in ADMIN_METHODS and tokens.admin_required and caller.role < Role.ADMIN:
            raise PermissionDenied(f"{_short(method)} changes a gallery and needs an admin token")
        return caller.name

    def _finish(
        self, call: Call, context: grpc.aio.ServicerContext, code: grpc.StatusCode, tally: _Tally
    ) -> None:
        seconds = time.monotonic() - call.started
        name = _short(call.method)
        self.in_flight -= 1
        self.completed += 1
        if call.method not in HEALTH_METHODS:
            self._working -= 1
            if not self._working:
                self._idle.set()
        self._metrics.requests.labels(name, code.name).inc()
        self._metrics.latency.labels(name).observe(seconds)
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            self._metrics.expired.labels(name).inc()
        fields = {
            "rpc": name,
            "status": code.name,
            "images": tally.images,
            "duration_ms": round(seconds * 1000, 2),
            "request_id": call.request_id,
            "peer": context.peer(),
        }
        if call.caller:
            fields["caller"] = call.caller
        if tally.messages > 1:
            fields["messages"] = tally.messages
        if code is not grpc.StatusCode.OK:
            fields["error"] = context.details() or ""
        level = logging.DEBUG if call.method in HEALTH_METHODS else logging.INFO
        access.log(level, "%s %s", name, code.name, extra={"fields": fields})

    # -- behaviours --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serving(
        self, method: str, context: grpc.aio.ServicerContext, request: Any, request_stream: bool
    ) -> AsyncIterator[Any]:
        """Around one call: checks, then the servicer (the body), then accounting. Yields the
        request to hand to the servicer (a checked iterator for request streams)."""
        call = self._begin(method, context)
        tally = _Tally()
        code = grpc.StatusCode.OK
        try:
            self._authorize(method, context, call)
            if request_stream:
                yield self._checked_stream(request, tally)
            else:
                _check_body(request, tally)
                yield request
        except ServiceError as exc:
            code = status_code(exc)
            # Some errors carry structured details for the caller (e.g. per-image results).
            await _abort(context, code, str(exc), getattr(exc, "trailing_metadata", ()))
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = _cancelled_code(call)
            raise
        except Exception:
            log.exception("unhandled error in %s", method)
            code = grpc.StatusCode.INTERNAL
            await _abort(context, code, "internal error")
        finally:
            self._finish(call, context, _final_code(context, code), tally)

    def _unary(self, behaviour, method: str, request_stream: bool = False):
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._serving(method, context, request, request_stream) as checked:
                return await behaviour(checked, context)

        return run

    def _streaming(self, behaviour, method: str, request_stream: bool):
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._serving(method, context, request, request_stream) as checked:
                responses = behaviour(checked, context)
                if inspect.isasyncgen(responses):
                    async for response in responses:
                        yield response
                else:  # a coroutine writing with context.write (e.g. Health/Watch)
                    await responses

        return run


async def _abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str | bytes], ...] = (),
) -> None:
    """Ends the call with `code`, unless the caller already left (deadline, cancel): then
    there is nobody to answer, and gRPC forbids a status on a finished call."""
    if context.cancelled() or context.done():
        raise asyncio.CancelledError
    if trailing:
        # abort() replaces trailing metadata already set (the request id): keep it.
        trailing = tuple(context.trailing_metadata() or ()) + tuple(trailing)
    await context.abort(code, clip_details(details), trailing_metadata=trailing)


def _unread_body(data: bytes) -> _Malformed:
    # Never called: a refused call's body is not read. Parsing nothing keeps it so if it were.
    return _Malformed("request refused before its body was read")


def _check_body(request: Any, tally: _Tally) -> None:
    if isinstance(request, _Malformed):
        raise InvalidArgument(request.message)
    tally.messages = 1
    tally.images = _count_images(request)


def _final_code(context: grpc.aio.ServicerContext, code: grpc.StatusCode) -> grpc.StatusCode:
    # A servicer may set a status without raising (set_code); that one is the answer.
    if code is grpc.StatusCode.OK:
        return context.code() or code
    return code


def _cancelled_code(call: Call) -> grpc.StatusCode:
    if call.deadline is not None and time.monotonic() >= call.deadline:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _short(method: str) -> str:
    """'/adaface.v1.Embedder/Embed' -> 'Embedder/Embed'."""
    service, _, name = method.rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


def _request_type_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"
