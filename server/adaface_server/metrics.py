"""Prometheus metrics, served over HTTP on their own port (`--metrics-port`).

Each App owns its registry, so several servers in one process (tests) never share counters.
Values that already live elsewhere (queue depth, gallery sizes) are read when scraped rather
than mirrored, so they cannot drift.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import StartupError

log = logging.getLogger(__name__)

# Latency buckets from 1 ms to 1 min: cropped embeds take milliseconds, a big Import minutes.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

GallerySizes = Callable[[], Iterable[tuple[str, int, int]]]  # (gallery, identities, samples)


class _Live(Collector):
    """Gauges computed at scrape time from the running services."""

    def __init__(self) -> None:
        self.in_flight: Callable[[], int] = lambda: 0
        self.queue_depth: Callable[[], int] = lambda: 0
        self.gallery_sizes: GallerySizes = lambda: ()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily("adaface_requests_in_flight", "RPCs being handled")
        in_flight.add_metric([], self.in_flight())
        yield in_flight
        queue = GaugeMetricFamily(
            "adaface_queue_depth", "Images waiting for (or in flight to) the model backend"
        )
        queue.add_metric([], self.queue_depth())
        yield queue
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


class Metrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
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
        self.live = _Live()
        r.register(self.live)
        self._http = None
        self._thread = None
        self.port = -1

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns its port (-1 when turned off)."""
        if port < 0:
            return -1
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror}; "
                "pick another --metrics-port (or -1 to turn metrics off)"
            ) from None
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
