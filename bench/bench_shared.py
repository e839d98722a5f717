"""Shared galleries: the read-your-writes check, enrollment with 1 and 3 processes, rebuilds.

Rows, each measured back to back in one run:
- Search latency at Q=1 through the gallery service with the change-log catch-up check
  against the same service with the check switched off (goal: at most 0.5 ms added);
- EnrollStream acknowledgements per second through 1 and 3 real server processes on one
  SQLite file and on one PostgreSQL database (each process fed by its own client);
- start-up rebuild of N vectors from each store (PostgreSQL: binary server-side cursor).
PostgreSQL runs as the tests' throw-away cluster (tests/integration/postgres_harness.py,
fsync=off: its commits skip the disk flush SQLite pays).
`--quick` shrinks every size.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adaface_server.config import Settings  # noqa: E402
from adaface_server.gallery import store as db  # noqa: E402
from adaface_server.gallery.records import SampleInput  # noqa: E402
from adaface_server.gallery.service import GalleryService  # noqa: E402
from adaface_server.gallery.stores import open_store  # noqa: E402
from adaface_server.gallery.transfer import TransferIdentity  # noqa: E402
from tests.integration.postgres_harness import PostgresCluster  # noqa: E402

DIM = 512
PASSWORD = "bench-only-password"


def unit_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(settings: Settings, n: int) -> float:
    """Writes one gallery of n one-sample identities in one transaction; returns seconds."""
    store = open_store(settings)
    store.open()
    vectors = unit_rows(n, 11)
    idents = [
        TransferIdentity(f"id{i}", {}, 0.0, vectors[i : i + 1], np.zeros(1, np.float32))
        for i in range(n)
    ]

    def op(conn):
        row = db.insert_gallery(conn, "big", "c" * 64, "bench", DIM, {})
        db.bulk_insert(conn, row.gallery_id, idents)
        return None, None

    t0 = time.perf_counter()
    store.submit(op).result()
    took = time.perf_counter() - t0
    store.close()
    return took


def open_service(settings: Settings) -> tuple[GalleryService, float]:
    service = GalleryService(settings, None)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    service._open()
    return service, time.perf_counter() - t0


def close_service(service: GalleryService) -> None:
    service._follower.stop()
    service.store.close()


def search_latency(service: GalleryService, probes: np.ndarray) -> tuple[float, float, float]:
    """Median seconds of one Q=1 search (vector probe, top 10) with the catch-up check and
    without it, interleaved probe by probe (in alternating order) so drifting load hits
    both alike; and the
    median of the check alone (as the service runs it: on a read thread)."""

    async def no_sync() -> None:
        service._check_open()

    async def run() -> tuple[float, float, float]:
        on, off, alone = [], [], []
        for n, p in enumerate(probes):
            pair = ((True, on), (False, off))
            for check, times in pair if n % 2 else pair[::-1]:  # alternate the order too
                if not check:
                    service._sync = no_sync  # type: ignore[method-assign]
                t0 = time.perf_counter()
                await service.search(
                    "big", [SampleInput(vector=p, dim=DIM)], 10, None, "max", False, "c" * 64
                )
                times.append(time.perf_counter() - t0)
                if not check:
                    del service._sync
            t0 = time.perf_counter()
            await service._sync()
            alone.append(time.perf_counter() - t0)
        return statistics.median(on), statistics.median(off), statistics.median(alone)

    return asyncio.run(run())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enroll_rate(repo: Path, store_args: list[str], env: dict, processes: int, count: int) -> float:
    """Total acknowledgements per second, `count` enrollments per process at once."""
    from adaface_client import GalleryClient

    env = {**os.environ, "ADAFACE_LOG_LEVEL": "ERROR", "ADAFACE_METRICS_PORT": "-1", **env}
    ports = [free_port() for _ in range(processes)]
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adaface_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model-repository",
                str(repo),
                "--model",
                "bench_ir18",
                "--threads",
                "1",
                "--max-stream-inflight",
                "64",
                *store_args,
            ],
            env=env,
        )
        for port in ports
    ]
    gallery = f"enroll{processes}_{time.monotonic_ns()}"
    try:
        clients = [
            GalleryClient(f"127.0.0.1:{p}", timeout=60, retries=60, backoff=0.5) for p in ports
        ]
        for c in clients:
            c.list_galleries()  # waits (retries) until serving
        clients[0].create_gallery(gallery)
        vectors = unit_rows(count * processes, 3)
        done = [0] * processes

        def feed(k: int) -> None:
            items = (
                (f"s{k}_{i}", vectors[k * count + i : k * count + i + 1]) for i in range(count)
            )
            done[k] = sum(
                1
                for r in clients[k].enroll_many(gallery, items, window=64)
                if not isinstance(r, Exception)
            )

        threads = [threading.Thread(target=feed, args=(k,)) for k in range(processes)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        for c in clients:
            c.close()
        return sum(done) / took
    finally:
        for s in servers:
            s.send_signal(signal.SIGTERM)
        for s in servers:
            s.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--rebuild", type=int, default=0, help="vectors to rebuild (default 1M)")
    args = parser.parse_args()
    n_rebuild = args.rebuild or (20_000 if args.quick else 1_000_000)
    n_search = 2_000 if args.quick else 10_000
    enrolls = 150 if args.quick else 1000
    started = time.perf_counter()
    rows = [
        "| scenario | SQLite | PostgreSQL | notes |",
        "|---|---|---|---|",
    ]
    os.environ["PGPASSWORD"] = PASSWORD
    pg = PostgresCluster(PASSWORD).init()
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            stores = {
                "sqlite": Settings(gallery_path=tmp / "search.sqlite3"),
                "postgres": Settings(gallery_url=pg.url),
            }
            # Search with and without the catch-up check.
            cells = {}
            probes = unit_rows(300, 5)
            for name, settings in stores.items():
                fill(settings, n_search)
                service, _ = open_service(settings)
                search_latency(service, probes[:30])  # warm up
                on, off, alone = search_latency(service, probes)
                cells[name] = (
                    f"{on * 1e3:.2f} ms vs {off * 1e3:.2f} ms ({(on - off) * 1e3:+.2f} ms; "
                    f"the check alone {alone * 1e3:.2f} ms)"
                )
                close_service(service)
            rows.append(
                f"| Search Q=1, {n_search // 1000}k identities: with catch-up check vs without "
                f"| {cells['sqlite']} | {cells['postgres']} | medians of {len(probes)}, "
                "interleaved; goal +0.5 ms at most |"
            )
            print(rows[-1], flush=True)
            # Enrollment through 1 and 3 processes.
            from adaface_server.models.export import export_model

            repo = tmp / "repo"
            export_model(None, "ir_18", repo, "bench_ir18", max_batch_size=8)
            args_of = {
                "sqlite": ["--gallery-path", str(tmp / "enroll.sqlite3")],
                "postgres": ["--gallery-url", pg.url],
            }
            for processes in (1, 3):
                rate = {
                    name: enroll_rate(repo, a, {}, processes, enrolls)
                    for name, a in args_of.items()
                }
                rows.append(
                    f"| EnrollStream acks/s, {processes} process(es), {enrolls} each, window 64 "
                    f"| {rate['sqlite']:.0f} /s | {rate['postgres']:.0f} /s | one vector per "
                    "identity, durable acknowledgement |"
                )
                print(rows[-1], flush=True)
            # Start-up rebuild.
            rebuild = {}
            for name, settings in {
                "sqlite": Settings(gallery_path=tmp / "rebuild.sqlite3"),
                "postgres": Settings(gallery_url=pg.url.rsplit("/", 1)[0] + "/rebuild"),
            }.items():
                if name == "postgres":
                    import psycopg

                    with psycopg.connect(pg.url, autocommit=True) as conn:
                        conn.execute("CREATE DATABASE rebuild")
                write = fill(settings, n_rebuild)
                gc.collect()
                service, took = open_service(settings)
                close_service(service)
                del service
                gc.collect()
                rebuild[name] = f"{took:.1f} s (written in {write:.1f} s)"
            rows.append(
                f"| start-up rebuild of {n_rebuild // 1000}k vectors | {rebuild['sqlite']} | "
                f"{rebuild['postgres']} | one transaction each; fp32 exact index |"
            )
            print(rows[-1], flush=True)
    finally:
        pg.remove()
    print(f"\n## Shared galleries ({time.perf_counter() - started:.0f} s)\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
