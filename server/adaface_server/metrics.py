"""Prometheus metrics, served over HTTP on their own port (`--metrics-port`).

With tokens configured, a scrape needs one (`authorization: Bearer <token>`, Prometheus'
`authorization` setting); without, anyone who can reach `--metrics-host` may read them.

Each App owns its registry, so several servers in one process (tests) never share counters.
Values that already live elsewhere (queue depth, gallery sizes) are read when scraped rather
than mirrored, so they cannot drift.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import StartupError

log = logging.getLogger(__name__)

# Latency buckets from 1 ms to 1 min: cropped embeds take milliseconds, a big Import minutes.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

GallerySizes = Callable[[], Iterable[tuple[str, int, int]]]  # (gallery, identities, samples)
GalleryMemory = Callable[[], Iterable[tuple[str, int, int]]]  # (gallery, host, device bytes)
#: adaface_gallery_index_bytes: what an index holds in host memory and on its search device
#: (--gallery-device); with --workers N each worker holds its own copy, so workers add up.
INDEX_BYTES = ("adaface_gallery_index_bytes", "Bytes a gallery index holds, by memory")
#: Given the request's `Authorization` header (None when absent), whether it may scrape.
ScrapeCheck = Callable[[str | None], bool]


class _Live(Collector):
    """Gauges computed at scrape time from the running services."""

    def __init__(self, gallery_labels: bool = True) -> None:
        self.in_flight: Callable[[], int] = lambda: 0
        self.queue_depth: Callable[[], int] = lambda: 0
        self.gallery_sizes: GallerySizes = lambda: ()
        self.gallery_memory: GalleryMemory = lambda: ()
        self.gallery_labels = gallery_labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("adaface_requests_in_flight", "RPCs being handled")
        in_flight.add_metric([], self.in_flight())
        yield in_flight
        queue = GaugeMetricFamily(
            "adaface_queue_depth", "Images waiting for (or in flight to) the model backend"
        )
        queue.add_metric([], self.queue_depth())
        yield queue
        memory = list(self.gallery_memory())
        if not self.gallery_labels:
            # Gallery names can be confidential: totals over every gallery instead.
            sizes = list(self.gallery_sizes())
            for metric, what, total in (
                ("adaface_gallery_identities", "Identities", sum(s[1] for s in sizes)),
                ("adaface_gallery_samples", "Samples", sum(s[2] for s in sizes)),
            ):
                family = GaugeMetricFamily(metric, f"{what} enrolled in all galleries")
                family.add_metric([], total)
                yield family
            family = GaugeMetricFamily(*INDEX_BYTES, labels=["memory"])
            family.add_metric(["host"], sum(m[1] for m in memory))
            family.add_metric(["device"], sum(m[2] for m in memory))
            yield family
            return
        identities = GaugeMetricFamily(
            "adaface_gallery_identities", "Identities enrolled per gallery", labels=["gallery"]
        )
        samples = GaugeMetricFamily(
            "adaface_gallery_samples", "Samples enrolled per gallery", labels=["gallery"]
        )
        for name, n_identities, n_samples in self.gallery_sizes():
            identities.add_metric([name], n_identities)
            samples.add_metric([name], n_samples)
        yield identities
        yield samples
        family = GaugeMetricFamily(*INDEX_BYTES, labels=["gallery", "memory"])
        for name, host, device in memory:
            family.add_metric([name, "host"], host)
            family.add_metric([name, "device"], device)
        yield family


class Metrics:
    """Every metric the server exports."""

    def __init__(self, gallery_labels: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adaface_requests",
            "RPCs answered, by method and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "adaface_request_duration_seconds",
            "RPC duration from arrival to answer, by method",
            ["method"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "adaface_batch_size",
            "Rows (images and flips) per forward pass",
            buckets=_BATCH,
            registry=r,
        )
        self.inference = Histogram(
            "adaface_inference_duration_seconds",
            "Model backend time per forward pass",
            buckets=_LATENCY,
            registry=r,
        )
        self.image_failures = Counter(
            "adaface_image_failures",
            "Images that produced no embedding, by reason (ImageError.Reason)",
            ["reason"],
            registry=r,
        )
        self.expired = Counter(
            "adaface_deadline_expired",
            "RPCs that ended because the caller's deadline passed, by method",
            ["method"],
            registry=r,
        )
        self.rows_dropped = Counter(
            "adaface_rows_dropped",
            "Images taken off the model queue unrun: their caller's deadline passed or it left",
            registry=r,
        )
        self.live = _Live(gallery_labels)
        r.register(self.live)
        self._http = None
        self.port = -1

    def serve(self, host: str, port: int, allowed: ScrapeCheck = lambda header: True) -> int:
        """Starts the /metrics HTTP endpoint; returns its port (-1 when turned off). A scrape
        whose `Authorization` header `allowed` refuses gets 401."""
        if port < 0:
            return -1
        self._http = serve_registry(self.registry, host, port, allowed)
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_registry(
    registry: CollectorRegistry, host: str, port: int, allowed: ScrapeCheck
) -> WSGIServer:
    """Serves `registry` as /metrics on host:port from a daemon thread; a scrape whose
    `Authorization` header `allowed` refuses gets 401. Stop it with shutdown()."""
    app = _guarded(make_wsgi_app(registry), allowed)
    try:
        server = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
            "pick another --metrics-port (or -1 to turn metrics off)"
        ) from None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not worth a log line each


def _guarded(app: Callable, allowed: ScrapeCheck) -> Callable:
    """The WSGI app behind a bearer-token check."""

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if not allowed(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"metrics need 'Authorization: Bearer <token>'\n"]
        return app(environ, start_response)

    return guarded
