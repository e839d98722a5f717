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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LiveGauge:
    """One scrape-time gauge: its name, help, label names and (label values, value) rows.
    `across_workers` says how the parent of --workers N combines the workers' values
    (prometheus_client's multiprocess_mode): livesum for what each worker holds on its own,
    livemax for what they share (gallery sizes come from the one store)."""

    name: str
    help: str
    labels: tuple[str, ...]
    values: tuple[tuple[tuple[str, ...], float], ...]
    across_workers: str


class _Live(Collector):
    """Gauges computed at scrape time from the running services."""

    def __init__(self, gallery_labels: bool = True) -> None:
        self.in_flight: Callable[[], int] = lambda: 0
        self.queue_depth: Callable[[], int] = lambda: 0
        self.gallery_sizes: GallerySizes = lambda: ()
        self.gallery_memory: GalleryMemory = lambda: ()
        self.gallery_labels = gallery_labels

    def gauges(self) -> list[LiveGauge]:
        """Every live gauge's current value. Gallery names can be confidential
        (gallery_labels false): then totals over every gallery instead."""
        sizes = list(self.gallery_sizes())
        memory = list(self.gallery_memory())
        traffic = [
            LiveGauge(
                "adaface_requests_in_flight", "RPCs being handled", (),
                (((), self.in_flight()),), "livesum",
            ),
            LiveGauge(
                "adaface_queue_depth", "Images waiting for (or in flight to) the model backend",
                (), (((), self.queue_depth()),), "livesum",
            ),
        ]  # fmt: skip
        if self.gallery_labels:
            identities = tuple(((name,), n) for name, n, _ in sizes)
            samples = tuple(((name,), n) for name, _, n in sizes)
            index = tuple(
                row
                for name, host, device in memory
                for row in (((name, "host"), host), ((name, "device"), device))
            )
            where, scope = ("gallery",), "per gallery"
        else:
            identities = (((), sum(s[1] for s in sizes)),)
            samples = (((), sum(s[2] for s in sizes)),)
            index = (
                (("host",), sum(m[1] for m in memory)),
                (("device",), sum(m[2] for m in memory)),
            )
            where, scope = (), "in all galleries"
        return [
            *traffic,
            LiveGauge(
                "adaface_gallery_identities", f"Identities enrolled {scope}", where,
                identities, "livemax",
            ),
            LiveGauge(
                "adaface_gallery_samples", f"Samples enrolled {scope}", where, samples, "livemax"
            ),
            LiveGauge(*INDEX_BYTES, (*where, "memory"), index, "livesum"),
        ]  # fmt: skip

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for gauge in self.gauges():
            family = GaugeMetricFamily(gauge.name, gauge.help, labels=gauge.labels)
            for labels, value in gauge.values:
                family.add_metric(labels, value)
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
