"""Pre-forked workers: a supervising parent runs N server processes on one port.

The parent does no request work. It reserves the port, starts each worker as
`python -m adaface_server ... --workers 1 --reuse-port true` (every worker loads its own
model and preprocessing threads; the kernel spreads connections over them with
SO_REUSEPORT), restarts a worker that dies, forwards SIGTERM/SIGINT (graceful drain) and
SIGHUP (token reload), and serves the workers' Prometheus metrics, aggregated with
prometheus_client's multiprocess mode, on the one `--metrics-port`.

Health is "all workers serving": each worker drops a marker file in a state folder the
parent owns while it is SERVING, and reports SERVING itself only when every expected worker
has one; the parent removes the marker of a worker that died. Whichever worker a health
check reaches therefore answers for all of them.

Galleries are opened by each worker and shared through the store and its change log
(gallery/changelog.py); sampling build slots are shared through lock files in the state
folder (sampling/slots.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .config import Settings
from .errors import StartupError
from .metrics import serve_registry
from .security import bearer_allowed, load_tokens

log = logging.getLogger("adaface_server.supervisor")

EXPECTED_FILE = "expected-workers"
POLL_SECONDS = 0.2
#: A worker that dies sooner than this after starting is restarted with growing backoff.
QUICK_DEATH_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 30.0
#: Extra time over --grace-seconds for workers to close before the parent kills them.
STOP_MARGIN_SECONDS = 10.0
#: Worker processes per machine for --workers auto. CPU: one worker per 8 cores, each with
#: its share of the cores as intra-op threads. On a quiet 2-core Xeon with AMX, 2 workers x 1
#: thread served 0.63-0.70x what 1 worker x 2 threads did (bench_hardware.py, IR-50, bf16):
#: the model wants the cores; only on a 2-core EPYC shared with ~7 other jobs did
#: single-threaded workers win (5x), as they lose less to interference. 8 cores a worker is
#: a judgement for larger CPUs (not measured here): one Python process cannot feed dozens.
#: GPU: one Python process is the bottleneck and four processes gave 3.3x one (notes: H200,
#: 16 cores).
CPU_CORES_PER_WORKER = 8
CPU_AUTO_MAX_WORKERS = 8
GPU_AUTO_WORKERS = 4
GPU_CORES_PER_WORKER = 4


def resolve_workers(
    setting: str, cores: int | None = None, cuda: bool | None = None, device: str = "auto"
) -> int:
    """--workers N or auto: one per 8 cores on CPU (at least 1, at most 8), up to 4 with CUDA
    (4 cores each); a model kept on the CPU (--device cpu) takes the CPU rule on a GPU host."""
    if setting != "auto":
        return int(setting)
    cores = cores or len(os.sched_getaffinity(0))
    if device == "cpu":
        cuda = False
    if cuda is None:
        try:
            import torch

            cuda = torch.cuda.is_available()
        except ImportError:
            cuda = False
    if not cuda:
        return max(1, min(CPU_AUTO_MAX_WORKERS, cores // CPU_CORES_PER_WORKER))
    return max(1, min(GPU_AUTO_WORKERS, cores // GPU_CORES_PER_WORKER))


class WorkerReadiness:
    """Inside a worker: publishes its own readiness, and reads everyone's."""

    def __init__(self, settings: Settings) -> None:
        self._dir = Path(settings.worker_state_dir) if settings.worker_state_dir else None
        self._marker = self._dir / f"serving-{os.getpid()}" if self._dir else None

    def all_serving(self, own_ready: bool) -> bool:
        if self._dir is None or self._marker is None:
            return own_ready
        if own_ready:
            self._marker.touch()
        else:
            self._marker.unlink(missing_ok=True)
        try:
            expected = int((self._dir / EXPECTED_FILE).read_text())
        except (OSError, ValueError):
            return False
        return own_ready and len(list(self._dir.glob("serving-*"))) >= expected

    def leave(self) -> None:
        if self._marker is not None:
            self._marker.unlink(missing_ok=True)


LIVE_PUBLISH_SECONDS = 1.0


async def publish_live_gauges(live, seconds: float = LIVE_PUBLISH_SECONDS) -> None:
    """Inside a worker: copies the scrape-time gauges (metrics._Live.gauges) into
    multiprocess gauges every `seconds`, so the parent's /metrics combines them over the live
    workers (each gauge's `across_workers`; a dead worker's values are dropped by
    mark_process_dead)."""
    import asyncio

    from prometheus_client import Gauge

    published: dict[str, Gauge] = {}
    while True:
        for live_gauge in live.gauges():
            gauge = published.get(live_gauge.name)
            if gauge is None:
                # registry=None: these exist only in the multiprocess files the parent reads.
                gauge = published[live_gauge.name] = Gauge(
                    live_gauge.name, live_gauge.help, live_gauge.labels, registry=None,
                    multiprocess_mode=live_gauge.across_workers,
                )  # fmt: skip
            for labels, value in live_gauge.values:
                (gauge.labels(*labels) if labels else gauge).set(value)
        await asyncio.sleep(seconds)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Binds (without listening) with SO_REUSEPORT: holds the port for the workers, and
    fails when a process that does not share (a plain server) already has it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0
        self.backoff = 0.0
        self.due = 0.0  # monotonic time of the next start


class Supervisor:
    """Owns the workers for the life of the parent process."""

    def __init__(self, settings: Settings, argv: Sequence[str], workers: int) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.count = workers
        self.state_dir = Path(tempfile.mkdtemp(prefix="adaface-workers-"))
        self.metrics_dir = self.state_dir / "prometheus"
        self.metrics_dir.mkdir()
        (self.state_dir / EXPECTED_FILE).write_text(str(workers))
        self.workers = [_Worker(i) for i in range(workers)]
        self.port = 0
        self._stopping = False
        self._http = None

    # -- start-up ----------------------------------------------------------------------

    def _threads_per_worker(self) -> int:
        if self.settings.threads:
            return self.settings.threads
        # workers x intra-op threads <= cores: oversubscribed cores cost far more than idle ones
        return max(1, len(os.sched_getaffinity(0)) // self.count)

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "adaface_server",
            *self.argv,
            # Later flags win: these make the child a worker on the reserved port.
            "--workers", "1",
            "--reuse-port", "true",
            "--port", str(self.port),
            "--metrics-port", "-1",
            "--threads", str(self._threads_per_worker()),
            "--worker-state-dir", str(self.state_dir),
        ]  # fmt: skip

    def _spawn(self, worker: _Worker) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        worker.proc = subprocess.Popen(self._command(), env=env)
        worker.started = time.monotonic()
        log.info("worker %d started: pid %d", worker.index, worker.proc.pid)

    def _serve_metrics(self) -> None:
        if self.settings.metrics_port < 0:
            return
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))
        host, port = self.settings.metrics_host, self.settings.metrics_port
        # The same bearer-token rule as a single server's /metrics.
        tokens = load_tokens(self.settings)
        self._http = serve_registry(
            registry, host, port, lambda header: bearer_allowed(tokens, header)
        )
        log.info(
            "metrics of %d workers on http://%s:%d/metrics",
            self.count,
            host,
            self._http.server_port,
        )

    # -- running -----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame) -> None:
        if signum == signal.SIGHUP:
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.send_signal(signal.SIGHUP)
            return
        self._stopping = True

    def _reap(self, worker: _Worker) -> None:
        from prometheus_client import multiprocess

        proc = worker.proc
        assert proc is not None
        (self.state_dir / f"serving-{proc.pid}").unlink(missing_ok=True)
        multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))
        lived = time.monotonic() - worker.started
        worker.backoff = (
            min(MAX_BACKOFF_SECONDS, max(1.0, 2 * worker.backoff))
            if lived < QUICK_DEATH_SECONDS
            else 0.0
        )
        worker.due = time.monotonic() + worker.backoff
        worker.restarts += 1
        worker.proc = None
        log.error(
            "worker %d (pid %d) exited with status %s after %.1f s; restarting in %.1f s",
            worker.index,
            proc.pid,
            proc.returncode,
            lived,
            worker.backoff,
        )

    def run(self) -> int:
        reserved = _reserve_port(self.settings.host, self.settings.port)
        self.port = reserved.getsockname()[1]
        try:
            self._serve_metrics()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            log.info(
                "supervising %d workers on %s:%d, %d intra-op threads each",
                self.count,
                self.settings.host,
                self.port,
                self._threads_per_worker(),
            )
            for worker in self.workers:
                self._spawn(worker)
            while not self._stopping:
                now = time.monotonic()
                for worker in self.workers:
                    if worker.proc is not None and worker.proc.poll() is not None:
                        self._reap(worker)
                    if worker.proc is None and now >= worker.due and not self._stopping:
                        self._spawn(worker)
                time.sleep(POLL_SECONDS)
            self._stop()
        finally:
            reserved.close()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return 0

    def _stop(self) -> None:
        """Forwards SIGTERM: every worker drains its in-flight calls (--grace-seconds)."""
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        log.info(
            "shutting down %d workers (grace %.1fs)", len(running), self.settings.grace_seconds
        )
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_seconds + STOP_MARGIN_SECONDS
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        log.info("all workers stopped")


def run_workers(settings: Settings, argv: Sequence[str], workers: int) -> int:
    """Entry point of the supervising parent; returns the process exit status."""
    return Supervisor(settings, argv, workers).run()
