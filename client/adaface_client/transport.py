"""Client channels: TLS credentials, bearer tokens and request ids as call metadata."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio

__all__ = [
    "AUTHORIZATION_KEY",
    "REQUEST_ID_KEY",
    "TOKEN_ENV",
    "check_token",
    "current_request_id",
    "open_aio_channel",
    "open_channel",
    "read_token_file",
    "request_id_of",
    "tls_credentials",
    "use_request_id",
]

AUTHORIZATION_KEY = "authorization"
REQUEST_ID_KEY = "x-request-id"
#: The CLIs read the bearer token from this variable when no --token-file is given.
TOKEN_ENV = "ADAFACE_TOKEN"

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "adaface_request_id", default=None
)

PathLike = str | os.PathLike
# What the server takes as a caller's request id (it makes up its own for anything else).
_REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


# --------------------------------------------------------------------------------------
# Tokens and request ids


def _is_metadata_text(value: str) -> bool:
    # gRPC only carries printable ASCII in text metadata; anything else fails every call.
    return bool(value) and all(" " < ch <= "~" for ch in value)


def check_token(token: str) -> str:
    """Returns `token` if it can travel as `authorization: Bearer <token>`, else ValueError.

    The message never contains the token itself."""
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    if not _is_metadata_text(token):
        raise ValueError(
            f"token must be non-empty printable ASCII without spaces (got {len(token)} "
            "characters; its value is not shown)"
        )
    return token


def read_token_file(path: PathLike) -> str:
    """The bearer token stored in `path` (surrounding whitespace ignored); ValueError when the
    file holds no token or more than one. Errors name the file, never its contents."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parts = text.split()
    if len(parts) != 1:
        what = "no token" if not parts else f"{len(parts)} whitespace-separated words"
        raise ValueError(f"token file {os.fspath(path)} must hold exactly one token, found {what}")
    try:
        return check_token(parts[0])
    except ValueError:
        raise ValueError(
            f"token file {os.fspath(path)}: the token must be printable ASCII"
        ) from None


@contextlib.contextmanager
def use_request_id(request_id: str) -> Iterator[str]:
    """Every RPC a client starts inside the block (in this thread, or asyncio tasks created
    inside it) carries `request_id` as `x-request-id` metadata instead of a fresh uuid4 hex,
    so one job's calls share one id in the server's logs and in AdafaceError.request_id.
    An id is 1 to 128 characters of letters, digits and ._:/+=-"""
    if not isinstance(request_id, str) or not _REQUEST_ID_FORM.fullmatch(request_id):
        raise ValueError(
            f"request_id must be 1-128 characters of A-Z a-z 0-9 . _ : / + = -, got {request_id!r}"
        )
    reset = _REQUEST_ID.set(request_id)
    try:
        yield request_id
    finally:
        _REQUEST_ID.reset(reset)


def current_request_id() -> str | None:
    """The id set by an enclosing use_request_id(), else None."""
    return _REQUEST_ID.get()


def request_id_of(error: BaseException) -> str:
    """The `x-request-id` a server put in an RpcError's trailing metadata ('' when none)."""
    getter = getattr(error, "trailing_metadata", None)
    if not callable(getter):
        return ""
    try:
        metadata = getter() or ()
    except Exception:  # a half-built error object must not hide the original failure
        return ""
    for key, value in metadata:
        if key == REQUEST_ID_KEY:
            return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return ""


def _metadata(existing: Iterable[tuple[str, Any]] | None, token: str | None) -> list:
    items = list(existing or ())
    keys = {key for key, _ in items}
    # Metadata the caller set explicitly wins over what the client adds.
    if token is not None and AUTHORIZATION_KEY not in keys:
        items.append((AUTHORIZATION_KEY, f"Bearer {token}"))
    if REQUEST_ID_KEY not in keys:
        items.append((REQUEST_ID_KEY, current_request_id() or uuid.uuid4().hex))
    return items


# --------------------------------------------------------------------------------------
# Interceptors


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """Sync call details with our metadata added (grpc's own class is private)."""


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token and a request id to every call of a blocking channel.

    An interceptor rather than access_token_call_credentials, which gRPC refuses to send
    over an insecure channel (a sidecar-terminated TLS deployment still needs the token)."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            _metadata(details.metadata, self._token),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


class _AioMetadataInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """The asyncio twin of _MetadataInterceptor."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata.from_tuple(tuple(_metadata(details.metadata, self._token)))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request)

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(client_call_details), request_iterator)


# --------------------------------------------------------------------------------------
# TLS and channels


def _read_pem(path: PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        data = f.read()
    # gRPC reports a bad PEM only as an opaque handshake failure at the first call.
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {os.fspath(path)} is not a PEM file")
    return data


def tls_credentials(
    ca: PathLike | None = None,
    certificate: PathLike | None = None,
    private_key: PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files, for any client's `credentials=`.

    `ca`: the CA bundle that signed the server's certificate (None: the system's roots);
    `certificate` and `private_key`: this client's own chain and key, for servers that
    require mutual TLS (give both or neither)."""
    if (certificate is None) != (private_key is None):
        raise ValueError("certificate and private_key go together (mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca, "CA bundle"),
        private_key=_read_pem(private_key, "private key"),
        certificate_chain=_read_pem(certificate, "certificate"),
    )


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel (TLS when `credentials` are given) whose every call carries the
    token and an x-request-id."""
    if token is not None:
        check_token(token)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    return grpc.intercept_channel(channel, _MetadataInterceptor(token))


def open_aio_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """The grpc.aio twin of open_channel."""
    if token is not None:
        check_token(token)
    interceptors = [_AioMetadataInterceptor(token)]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
