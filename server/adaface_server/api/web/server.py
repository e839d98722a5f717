"""The HTTP server: routes each request to the RPC's servicer, under the same checks as gRPC.

Runs on aiohttp's AppRunner/TCPSite inside the event loop that serves grpc.aio, so both
transports share the service objects (batcher, galleries) with no second process. Around
every API call, in the interceptor's order: request id (`x-request-id` header, made up when
missing, echoed on every answer), bearer token and admin rule, deadline (`x-request-timeout`
header, seconds), body limit, the servicer,
then metrics and one access-log line. Service errors become the HTTP status of their gRPC
status, with the same message: `{"error": {"code", "message", "request_id"}}`.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web

from ...config import Settings
from ...embedding import EmbeddingService
from ...errors import InvalidArgument, PermissionDenied, ServiceError, Unauthenticated
from ...gallery.service import GalleryService
from ...logs import ACCESS_LOGGER
from ...metrics import Metrics
from ...request_context import Call, current_call
from ...security import Role, TokenSet
from ..embedder import EmbedderServicer
from ..gallery import GalleryServicer
from ..interceptor import REQUEST_ID_KEY, _request_id
from ..status import clip_details
from . import transcode
from .openapi import openapi_document
from .routes import ROUTES, Route
from .status import http_status

_IMAGES = web.ResponseKey("images", int)
log = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)

#: Header carrying the caller's deadline, as gRPC's timeout does; work still queued when it
#: passes is dropped and the answer is 504 DEADLINE_EXCEEDED.
TIMEOUT_HEADER = "x-request-timeout"
MAX_TIMEOUT_SECONDS = 86400.0
STATIC = resources.files(__package__) / "static"


class HttpServer:
    """The HTTP/JSON API, /openapi.json, /healthz and the web console at /."""

    def __init__(
        self,
        settings: Settings,
        embedding: EmbeddingService,
        gallery: GalleryService,
        metrics: Metrics,
        tokens: Callable[[], TokenSet],
    ) -> None:
        self._settings = settings
        self._embedding = embedding
        self._metrics = metrics
        self._tokens = tokens  # read per call: SIGHUP swaps the interceptor's set
        self._servicers: dict[str, Any] = {
            "Embedder": EmbedderServicer(embedding),
            "Gallery": GalleryServicer(gallery),
        }
        self.in_flight = 0
        self.completed = 0
        self.port = 0
        self._runner: web.AppRunner | None = None
        self.app = self._build()

    def _build(self) -> web.Application:
        # Bodies are read by the handlers against max_message_bytes, with our own message.
        app = web.Application(client_max_size=2**62, middlewares=[self._middleware])
        for route in ROUTES:
            app.router.add_route(route.verb, route.path, self._handler(route))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_get("/", self._console)
        app.router.add_static("/static/", str(STATIC), append_version=False)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0 picks a free port) on the running loop; returns the port."""
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self._settings.grace_seconds,
        )
        await self._runner.setup()
        # Pre-forked workers (--workers) share the HTTP port as they share the gRPC one; a
        # plain server keeps refusing a port that is taken.
        site = web.TCPSite(
            self._runner,
            host,
            port,
            ssl_context=self._ssl_context(),
            reuse_port=self._settings.reuse_port,
        )
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self._settings
        if not s.tls_certificate:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tls_certificate, s.tls_private_key)
        if s.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(s.tls_client_ca)
        return context

    # -- the checks around every request --------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        rid = _request_id(((REQUEST_ID_KEY, request.headers.get(REQUEST_ID_KEY, "")),))
        route: Route | None = getattr(handler, "route", None)
        call = Call(
            method=route.method if route else request.path,
            request_id=rid,
            started=time.monotonic(),
            deadline=None,
        )
        current_call.set(call)
        self.in_flight += 1
        code, error, images = "OK", "", 0
        try:
            if route is not None:
                self._authorize(route, request, call)
                call.deadline = _deadline(request.headers.get(TIMEOUT_HEADER), call.started)
            response = await handler(request)
            images = response.get(_IMAGES, 0)
            if response.status == 503:  # /healthz before the model is warm
                code = "UNAVAILABLE"
        except ServiceError as exc:
            code, error = exc.status, clip_details(str(exc))
            response = _error(code, error, rid, getattr(exc, "response", None))
        except web.HTTPException as exc:  # unknown path or verb
            code = {404: "NOT_FOUND", 405: "UNIMPLEMENTED"}.get(exc.status, "INVALID_ARGUMENT")
            error = exc.reason
            if exc.status in (404, 405):
                error = f"no route {request.method} {request.path}"
            response = _error(code, error, rid, status=exc.status)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            code, error = "INTERNAL", "internal error"
            response = _error(code, error, rid)
        finally:
            self.in_flight -= 1
        response.headers[REQUEST_ID_KEY] = rid
        if code == "UNAUTHENTICATED":
            response.headers["WWW-Authenticate"] = "Bearer"
        self._finish(request, route, call, code, error, response.status, images)
        return response

    def _authorize(self, route: Route, request: web.Request, call: Call) -> None:
        tokens = self._tokens()
        if not tokens.enabled:
            return
        header = request.headers.get("Authorization")
        token = None
        if header is not None:
            scheme, _, rest = header.partition(" ")
            token = rest.strip() if scheme.lower() == "bearer" else ""
        if not token:
            raise Unauthenticated(
                "missing credentials: send header 'Authorization: Bearer <token>'"
                if token is None
                else "malformed credentials: expected 'Authorization: Bearer <token>'"
            )
        caller = tokens.check(token)
        if caller is None:
            raise Unauthenticated("invalid bearer token")
        call.caller = caller.name
        if route.admin and tokens.admin_required and caller.role < Role.ADMIN:
            raise PermissionDenied(
                f"{route.service}/{route.rpc} changes a gallery and needs an admin token"
            )

    def _finish(
        self,
        request: web.Request,
        route: Route | None,
        call: Call,
        code: str,
        error: str,
        status: int,
        images: int,
    ) -> None:
        seconds = time.monotonic() - call.started
        self.completed += 1
        if route is not None:
            self._metrics.requests.labels(route.name, code).inc()
            self._metrics.latency.labels(route.name).observe(seconds)
            if code == "DEADLINE_EXCEEDED":
                self._metrics.expired.labels(route.name).inc()
        fields: dict[str, Any] = {
            "rpc": route.name if route else f"http:{request.method} {request.path}",
            "status": code,
            "http_status": status,
            "images": images,
            "duration_ms": round(seconds * 1000, 2),
            "request_id": call.request_id,
            "peer": request.remote or "",
        }
        if call.caller:
            fields["caller"] = call.caller
        if error:
            fields["error"] = error
        level = logging.INFO if route is not None or status >= 400 else logging.DEBUG
        access.log(level, "%s %s", fields["rpc"], code, extra={"fields": fields})

    # -- handlers ---------------------------------------------------------------------------

    def _handler(self, route: Route):
        servicer = getattr(self._servicers[route.service], route.rpc)

        async def handle(request: web.Request) -> web.Response:
            vectors = transcode.vector_format(request.query.get("vector_format"))
            message = await self._request_message(route, request)
            rid_field = message.DESCRIPTOR.fields_by_name.get("request_id")
            if rid_field is not None and not message.request_id:  # type: ignore[attr-defined]
                message.request_id = current_call.get().request_id  # type: ignore[union-attr]
            reply = await servicer(message, None)
            response = web.json_response(transcode.to_json(reply, vectors), dumps=_dumps)
            response[_IMAGES] = _count_images(message)
            return response

        handle.route = route  # type: ignore[attr-defined]
        return handle

    async def _request_message(self, route: Route, request: web.Request):
        descriptor = route.request.DESCRIPTOR
        data: dict[str, Any] = {}
        files: list[tuple[str, bytes]] = []
        text: dict[str, str] = {}
        if route.body:
            limit = self._settings.max_message_bytes
            if request.content_length is not None and request.content_length > limit:
                raise _too_big(request.content_length, limit)
            if request.content_type == "multipart/form-data":
                data, files, text = await _read_multipart(request, descriptor, route, limit)
            else:
                body = await _read_limited(request, limit)
                data = transcode.parse_json(body)
        for name, value in request.query.items():
            if name in route.query:
                transcode.set_text(descriptor, data, name, value)
            elif name != "vector_format":
                known = ", ".join((*route.query, "vector_format"))
                raise InvalidArgument(f"{name}: not a query parameter here (known: {known})")
        data.update(request.match_info)
        message = transcode.parse(route.request, data)
        for field, content in files:
            transcode.add_file(message, route.files[field], content, text)
        return message

    async def _healthz(self, request: web.Request) -> web.Response:
        serving = self._embedding.ready()
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(), dumps=_dumps)

    async def _console(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(str(STATIC / "index.html"))


def _dumps(data: Any) -> str:
    # The newline keeps a shell prompt off the end of curl's output.
    return json.dumps(data, separators=(",", ":")) + "\n"


def _error(
    code: str, message: str, rid: str, details: Any = None, status: int | None = None
) -> web.Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "request_id": rid}}
    if details is not None and hasattr(details, "DESCRIPTOR"):
        # e.g. every image failed: each image's own reason, as in the gRPC trailers.
        body["details"] = transcode.to_json(details)
    return web.json_response(body, status=status or http_status(code), dumps=_dumps)


def _deadline(header: str | None, started: float) -> float | None:
    """The gRPC deadline's HTTP twin: `x-request-timeout: <seconds>` from arrival."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_SECONDS):
        raise InvalidArgument(
            f"{TIMEOUT_HEADER}: need seconds in (0, {MAX_TIMEOUT_SECONDS:g}], got {header!r}"
        )
    return started + seconds


def _too_big(size: int, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"request is {size} bytes, over the limit of {limit} (max_message_bytes); "
        "split it into smaller requests"
    )


async def _read_limited(request: web.Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise _too_big(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_multipart(
    request: web.Request, descriptor, route: Route, limit: int
) -> tuple[dict, list[tuple[str, bytes]], dict[str, str]]:
    """Files go where route.files says; a `json` field holds a JSON body; other fields are
    request fields by name (dotted for nested ones), except `alignment`, which applies to
    the uploaded files."""
    data: dict[str, Any] = {}
    files: list[tuple[str, bytes]] = []
    text: dict[str, str] = {}
    size = 0
    reader = await request.multipart()
    async for part in reader:
        name = part.name or ""
        content = bytearray()
        while chunk := await part.read_chunk(1 << 16):
            size += len(chunk)
            if size > limit:
                raise _too_big(size, limit)
            content += chunk
        if part.filename is not None:
            if name not in route.files:
                allowed = ", ".join(sorted(route.files)) or "none"
                raise InvalidArgument(f"{name}: not a file field here (file fields: {allowed})")
            files.append((name, bytes(content)))
            continue
        value = content.decode("utf-8", errors="replace")
        if name == "json":
            data.update(transcode.parse_json(bytes(content)))
        elif name == "alignment" and route.files:
            text[name] = value
        else:
            transcode.set_text(descriptor, data, name, value)
    return data, files, text


def _count_images(message: Any) -> int:
    for name in ("images", "samples", "probes"):
        if name in message.DESCRIPTOR.fields_by_name:
            return len(getattr(message, name))
    return 0
