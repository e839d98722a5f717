"""Assembles the gRPC server: services, health, reflection, model loading and shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from adaface.v1 import (
    embedder_pb2,
    embedder_pb2_grpc,
    gallery_pb2,
    gallery_pb2_grpc,
    sampling_pb2,
    sampling_pb2_grpc,
)

from . import memory
from .api.embedder import EmbedderServicer
from .api.gallery import GalleryServicer
from .api.interceptor import RequestInterceptor
from .api.reflection import enable_reflection
from .api.sampling import SamplingServicer
from .api.web.server import HttpServer
from .backends.base import create_backend
from .config import Settings
from .embedding import EmbeddingService
from .errors import StartupError
from .gallery.service import GalleryService
from .metrics import Metrics
from .sampling.service import SamplingService
from .security import bearer_allowed, load_tokens, server_credentials
from .supervisor import WorkerReadiness, publish_live_gauges

log = logging.getLogger(__name__)

HEALTH_POLL_SECONDS = 0.2
#: On stop, how long the server looks for a late call once the last one has finished.
STOP_SETTLE_SECONDS = 0.05
MEMORY_TRIM_SECONDS = 2.0  # idle this long (2-4 s) after traffic, and the heap is trimmed

SERVICE_NAMES = (
    embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name,
    sampling_pb2.DESCRIPTOR.services_by_name["Sampling"].full_name,
    gallery_pb2.DESCRIPTOR.services_by_name["Gallery"].full_name,
)


class App:
    """One server process: `start()` binds and begins loading the model in the background;
    health reports NOT_SERVING until the model is loaded and warmed up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(gallery_labels=settings.metrics_gallery_labels)
        # Read here so a bad token file or certificate stops the server at start-up.
        tokens = load_tokens(settings)
        self._credentials = server_credentials(settings)
        self.embedding = EmbeddingService(settings, create_backend(settings), self.metrics)
        self.health = health.aio.HealthServicer()
        limit = settings.max_message_bytes
        self.calls = RequestInterceptor(settings, tokens, self.metrics)
        self.server = grpc.aio.server(
            interceptors=[self.calls],
            options=[
                # Up to twice the limit reaches the interceptor, which answers
                # INVALID_ARGUMENT naming max_message_bytes; beyond that gRPC itself refuses
                # the message (RESOURCE_EXHAUSTED) before reading it into memory.
                ("grpc.max_receive_message_length", min(2 * limit, 2**31 - 1)),
                ("grpc.max_send_message_length", limit),
                # A second server on the same port must fail, not silently share it;
                # pre-forked workers (--workers N) share it on purpose.
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            ],
        )
        embedder_pb2_grpc.add_EmbedderServicer_to_server(
            EmbedderServicer(self.embedding), self.server
        )
        self.sampling = SamplingService(settings, self.embedding)
        sampling_pb2_grpc.add_SamplingServicer_to_server(
            SamplingServicer(self.sampling), self.server
        )
        self.gallery = GalleryService(settings, self.embedding)
        gallery_pb2_grpc.add_GalleryServicer_to_server(GalleryServicer(self.gallery), self.server)
        self.http: HttpServer | None = None
        if settings.http_port >= 0:
            self.http = HttpServer(
                settings, self.embedding, self.gallery, self.metrics, lambda: self.calls.tokens
            )
        self.metrics.live.in_flight = lambda: self._traffic()[1]
        self.metrics.live.queue_depth = lambda: self.embedding.queued_rows
        self.metrics.live.gallery_sizes = self.gallery.sizes
        self.metrics.live.gallery_memory = self.gallery.memory
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), self.server)
        self.port = 0
        self.metrics_port = -1
        self.http_port = -1
        self._loader: asyncio.Task | None = None
        self._trimmer: asyncio.Task | None = None
        self._gallery_open: asyncio.Task | None = None
        # With --workers N: SERVING only while every worker is.
        self._workers = WorkerReadiness(settings)
        self._publisher: asyncio.Task | None = None

    async def start(self) -> int:
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            if _port_taken(self.settings.host, self.settings.port, self.settings.reuse_port):
                raise RuntimeError(address)  # gRPC would log its own line on top of ours
            if self._credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self._credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            # The TLS key pair was checked when the credentials were made.
            raise StartupError(
                f"cannot listen on {address}: the port is in use; if another "
                "adaface-server holds it, pick another port with --port (ADAFACE_PORT)"
            )
        settings = self.settings
        self.metrics_port = self.metrics.serve(
            settings.metrics_host,
            settings.metrics_port,
            lambda header: bearer_allowed(self.calls.tokens, header),
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            await self._start_http()
        await self.server.start()
        log.info(
            "listening on %s:%d (%s)",
            self.settings.host,
            self.port,
            _transport(self.settings),
        )
        # SQLite is opened and every gallery index rebuilt alongside the model load.
        self._gallery_open = asyncio.create_task(self.gallery.open(), name="gallery-open")
        self._loader = asyncio.create_task(self._load(), name="model-loader")
        self._trimmer = asyncio.create_task(self._trim_when_idle(), name="memory-trim")
        if settings.worker_state_dir:  # a supervised worker: gauges go to the parent's /metrics
            self._publisher = asyncio.create_task(
                publish_live_gauges(self.metrics.live), name="live-gauges"
            )
        return self.port

    async def _start_http(self) -> None:
        assert self.http is not None
        host, port = self.settings.host, self.settings.http_port
        try:
            self.http_port = await self.http.start(host, port)
        except OSError as exc:
            self.metrics.close()
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise StartupError(f"cannot listen on {host}:{port} (--http-port): {why}") from None
        scheme = "https" if self.settings.tls_certificate else "http"
        log.info("HTTP API and web console on %s://%s:%d/", scheme, host, self.http_port)

    def reload_tokens(self) -> bool:
        """Re-reads the token files and variables (SIGHUP). A file that cannot be read or
        holds a bad token keeps the tokens in force and logs why; True when replaced."""
        try:
            tokens = load_tokens(self.settings)
        except StartupError as exc:
            log.error("token reload failed, the previous tokens stay in force: %s", exc)
            return False
        self.calls.tokens = tokens
        log.info("tokens reloaded: %d", tokens.count)
        return True

    def _traffic(self) -> tuple[int, int]:
        """(calls answered, calls in flight) over gRPC and HTTP together."""
        done, running = self.calls.completed, self.calls.in_flight
        if self.http is not None:
            done, running = done + self.http.completed, running + self.http.in_flight
        return done, running

    async def _trim_when_idle(self) -> None:
        """After traffic stops, give the heap the burst left behind back to the OS."""
        if not memory.available():
            return
        seen = trimmed_at = self._traffic()[0]
        while True:
            await asyncio.sleep(MEMORY_TRIM_SECONDS)
            now, running = self._traffic()
            # Idle for a whole period (nothing finished, nothing running) after some traffic.
            if now == seen != trimmed_at and running == 0:
                trimmed_at = now
                await asyncio.to_thread(memory.trim)
            seen = now

    async def _load(self) -> None:
        try:
            await self.embedding.load()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("loading the model failed; the server stays NOT_SERVING")
            return
        if self._gallery_open is not None:
            await self._gallery_open  # never raises: gallery calls report its failure
        await self._follow_readiness()

    async def _follow_readiness(self) -> None:
        """Health tracks the backend after loading: a remote backend (Triton) may go away
        and come back, and health must say so without a restart."""
        serving: bool | None = None
        served = False  # with --workers, this one waits NOT_SERVING for the others at first
        while True:
            ready = self._workers.all_serving(self.embedding.ready())
            if ready != serving:
                if served:
                    log.warning(
                        "model backend %s", "back: SERVING" if ready else "lost: NOT_SERVING"
                    )
                elif ready and serving is not None:
                    log.info("every worker serving: SERVING")
                serving, served = ready, served or ready
                status = health_pb2.HealthCheckResponse
                await self._set_health(status.SERVING if ready else status.NOT_SERVING)
            # ready() only reads flags, so polling it is cheap; the backend does the probing.
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking new RPCs, lets in-flight ones finish within `grace`, then closes.

        New calls are refused by the interceptor (UNAVAILABLE, body unread) and gRPC's own
        stop comes only once ours are done: a call arriving while grpc.aio shuts down can be
        left unanswered until its deadline (seen on a loaded 2-core machine while streams
        were still in flight), whereas a refusal is immediate and says why."""
        grace = self.settings.grace_seconds if grace is None else grace
        deadline = asyncio.get_running_loop().time() + grace
        self.calls.refuse_new_calls()
        self._workers.leave()
        await self.health.enter_graceful_shutdown()
        if self._loader is not None:
            self._loader.cancel()
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self.http is not None:
            await self.http.stop()
        if self._publisher is not None:
            self._publisher.cancel()
        if not await self._drain(deadline):
            log.warning("grace of %.1fs ran out: cancelling the calls still in flight", grace)
        # What gRPC still holds now (health watches, calls past the grace) is cancelled.
        await self.server.stop(0)
        if self._gallery_open is not None:
            await self._gallery_open  # the rebuild runs in a thread: let it finish
            await self.gallery.close()
        self.sampling.close()
        await self.embedding.close()
        self.metrics.close()

    async def _drain(self, deadline: float) -> bool:
        """Waits until no call is in flight (health checks aside), at most until `deadline`
        (event-loop time); False when the deadline came first."""
        loop = asyncio.get_running_loop()
        while await self.calls.drained(deadline - loop.time()):
            # A call gRPC handed over just before the refusals began reaches the
            # interceptor a moment later: look again before closing.
            await asyncio.sleep(STOP_SETTLE_SECONDS)
            if self.calls.idle:
                return True
        return False

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def _transport(settings: Settings) -> str:
    if not settings.tls_certificate:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca else "TLS"


def _port_taken(host: str, port: int, reuse_port: bool = False) -> bool:
    """True when something already listens on host:port (checked the way gRPC binds: with
    `reuse_port`, as a worker sharing the port with its siblings)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False  # gRPC reports an unresolvable host itself
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False
