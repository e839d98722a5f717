"""Gallery search, memory, rebuild and enrollment, with ratios measured back to back.

Exact search (ExactIndex: sgemv/sgemm + argpartition, chunked, identity aggregation
included) against faiss IndexFlatIP on the same vectors, for 1/32/256 probes at 100k and
1M identities (one 512-d sample each); fp16 storage; HNSW recall@10 vs exact; memory per
million vectors; start-up rebuild of 1M vectors from SQLite; enrollment throughput through
a real server (EnrollStream vs sequential unary Enroll); the device search path
(`--gallery-device`, device_search) run by torch on the CPU against the default numpy path
(measured here; GPU figures come from bench_gpu.py). `--quick` shrinks every size.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from adaface_server.gallery import store as db
from adaface_server.gallery.index import Change, ExactIndex, HnswIndex
from adaface_server.gallery.transfer import TransferIdentity

DIM = 512
K = 10


def unit_rows(n: int, seed: int) -> np.ndarray:
    out = np.empty((n, DIM), np.float32)
    rng = np.random.default_rng(seed)
    for s in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - s), DIM), dtype=np.float32)
        out[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def probes_near(gallery: np.ndarray, q: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = gallery[rng.integers(0, len(gallery), q)] + 0.05 * rng.standard_normal((q, DIM))
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def exact_index(vectors: np.ndarray, dtype: str = "float32") -> ExactIndex:
    index = ExactIndex(DIM, dtype=dtype, capacity=len(vectors))
    n = len(vectors)
    labels = np.arange(1, n + 1, dtype=np.int64)
    index.apply(
        [
            Change(
                add_keys=labels,
                add_labels=labels,
                add_vectors=vectors,
                names={i: f"id{i}" for i in range(1, n + 1)},
                identity_delta=n,
            )
        ]
    )
    return index


def search_rows(sizes: list[int], probe_counts: list[int], rows: list[str]) -> None:
    import faiss

    for n in sizes:
        vectors = unit_rows(n, seed=n)
        ours = exact_index(vectors)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(ours.snapshot.samples.matrix)
        del vectors
        gc.collect()
        for q in probe_counts:
            probes = probes_near(ours.snapshot.samples.matrix, q, seed=q)
            reps = 3 if n * q <= 32 * 10**6 else 1
            ours.search(probes, K, None)  # warm
            t_ours = best_of(lambda p=probes, ix=ours: ix.search(p, K, None), reps)
            t_faiss = best_of(lambda p=probes, ix=flat: ix.search(p, K), reps)
            hits, _ = ours.search(probes, K, None)
            _, ids = flat.search(probes, K)
            same = np.mean(
                [
                    [h.label - 1 for h in hit] == list(row)
                    for hit, row in zip(hits, ids, strict=True)
                ]
            )
            rows.append(
                f"| search {n // 1000}k x {q} probes, fp32 | {t_ours * 1000:.1f} ms | "
                f"{t_faiss * 1000:.1f} ms | **{t_faiss / t_ours:.2f}** | "
                f"same top-{K}: {same:.0%} |"
            )
            print(rows[-1], flush=True)
        if n == sizes[-1]:
            half = copy_of(ours, ExactIndex(DIM, dtype="float16", capacity=n))
            snap = ours.snapshot.samples
            per_m32 = ours.stats().nbytes / n * 1e6 / 2**30
            per_m16 = half.stats().nbytes / n * 1e6 / 2**30
            rows.append(
                f"| memory per 1M vectors (matrix + ids) | fp32 {per_m32:.2f} GiB | "
                f"fp16 {per_m16:.2f} GiB | {per_m32 / per_m16:.2f}x smaller | |"
            )
            print(rows[-1], flush=True)
            for q in probe_counts[:2]:
                probes = probes_near(snap.matrix, q, seed=q)
                t32 = best_of(lambda p=probes, ix=ours: ix.search(p, K, None), 2)
                t16 = best_of(lambda p=probes, ix=half: ix.search(p, K, None), 2)
                t_faiss = best_of(lambda p=probes, ix=flat: ix.search(p, K), 1)
                hits32, _ = ours.search(probes, K, None)
                hits16, _ = half.search(probes, K, None)
                recall = np.mean(
                    [
                        len({h.label for h in a} & {h.label for h in b}) / K
                        for a, b in zip(hits32, hits16, strict=True)
                    ]
                )
                rows.append(
                    f"| search {n // 1000}k x {q} probes, fp16 | {t16 * 1000:.1f} ms | "
                    f"{t_faiss * 1000:.1f} ms | **{t_faiss / t16:.2f}** | "
                    f"fp32 {t32 * 1000:.1f} ms; recall@{K} vs fp32 {recall:.3f} |"
                )
                print(rows[-1], flush=True)
            del half
            device_cpu_rows(ours, probe_counts[:2], rows)
        del ours, flat
        gc.collect()


def copy_of(source: ExactIndex, target: ExactIndex) -> ExactIndex:
    """`target` filled with every sample of `source` (same keys, labels and names)."""
    snap = source.snapshot.samples
    change = Change(
        add_keys=snap.keys,
        add_labels=snap.labels,
        add_vectors=snap.matrix,
        names=source.snapshot.names,
        identity_delta=snap.n,
    )
    target.apply([change])
    return target


def device_cpu_rows(ours: ExactIndex, probe_counts: list[int], rows: list[str]) -> None:
    """The device search path with torch on the CPU (fp16 mirror, topk with a margin, fp32
    rescoring) against the default numpy path, fp32 storage: the code --gallery-device
    cuda runs, measured where no GPU is. The default stays numpy on the CPU."""
    snap = ours.snapshot.samples
    n = snap.n
    dev = copy_of(ours, ExactIndex(DIM, dtype="float32", capacity=n, device="cpu"))
    for q in probe_counts:
        probes = probes_near(snap.matrix, q, seed=q)
        dev.search(probes, K, None)  # warm
        t_host = best_of(lambda p=probes: ours.search(p, K, None), 3)
        t_dev = best_of(lambda p=probes: dev.search(p, K, None), 3)
        a, _ = ours.search(probes, K, None)
        b, _ = dev.search(probes, K, None)
        same = np.mean(
            [[h.label for h in x] == [h.label for h in y] for x, y in zip(a, b, strict=True)]
        )
        rows.append(
            f"| search {n // 1000}k x {q} probes, device path on the CPU (torch fp16 mirror) | "
            f"{t_dev * 1000:.1f} ms | numpy path {t_host * 1000:.1f} ms | "
            f"{t_host / t_dev:.2f} (numpy / device) | same top-{K}: {same:.0%} |"
        )
        print(rows[-1], flush=True)


def hnsw_rows(n: int, rows: list[str]) -> None:
    vectors = unit_rows(n, seed=7)
    exact = exact_index(vectors)
    t0 = time.perf_counter()
    ann = HnswIndex(DIM, m=16, ef_search=128, capacity=n)
    labels = np.arange(1, n + 1, dtype=np.int64)
    ann.apply([Change(add_keys=labels, add_labels=labels, add_vectors=vectors, identity_delta=n)])
    ann.snapshot.names.update(exact.snapshot.names)  # type: ignore[attr-defined]
    build = time.perf_counter() - t0
    # Probes that resemble enrolled faces, and unrelated ones (no true match).
    for kind, probes in (
        ("near", probes_near(vectors, 256, seed=1)),
        ("random", unit_rows(256, seed=2)),
    ):
        t_exact = best_of(lambda p=probes[:1]: exact.search(p, K, None), 3)
        t_ann = best_of(lambda p=probes[:1]: ann.search(p, K, None), 3)
        truth, _ = exact.search(probes, K, None)
        got, _ = ann.search(probes, K, None)
        recall = np.mean(
            [
                len({h.label for h in a} & {h.label for h in b}) / K
                for a, b in zip(truth, got, strict=True)
            ]
        )
        rows.append(
            f"| HNSW (M=16, efSearch=128) {n // 1000}k, {kind} probes | {t_ann * 1000:.2f} ms | "
            f"exact {t_exact * 1000:.1f} ms | {t_exact / t_ann:.1f}x | "
            f"recall@{K} vs exact {recall:.3f}; build {build:.0f} s |"
        )
        print(rows[-1], flush=True)


def rebuild_row(n: int, rows: list[str], tmp: Path) -> None:
    from adaface_server.config import Settings
    from adaface_server.gallery.service import GalleryService

    path = tmp / "rebuild.sqlite3"
    store = db.Store(path)
    store.open()
    vectors = unit_rows(n, seed=11)
    idents: list[TransferIdentity] = [
        TransferIdentity(f"id{i}", {}, 0.0, vectors[i : i + 1], np.zeros(1, np.float32))
        for i in range(n)
    ]

    def op(conn, idents=idents):
        row = db.insert_gallery(conn, "big", "c" * 64, "bench", DIM, {})
        db.bulk_insert(conn, row.gallery_id, idents)
        return None, None

    t0 = time.perf_counter()
    store.submit(op).result()
    write = time.perf_counter() - t0
    store.close()
    del idents, vectors
    gc.collect()
    size = path.stat().st_size / 2**30
    for dtype in ("float32",):
        service = GalleryService(Settings(gallery_path=path, gallery_dtype=dtype), None)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        service._open()
        took = time.perf_counter() - t0
        service._follower.stop()
        service.store.close()
        del service
        gc.collect()
        rows.append(
            f"| start-up: rebuild {n // 1000}k vectors from SQLite, {dtype} | {took:.1f} s | "
            f"| | file {size:.2f} GiB, written in one transaction in {write:.1f} s |"
        )
        print(rows[-1], flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def enroll_rows(count: int, rows: list[str], tmp: Path) -> None:
    import grpc

    from adaface_client import GalleryClient
    from adaface_server.models.export import export_model

    repo = tmp / "repo"
    export_model(None, "ir_18", repo, "bench_ir18", max_batch_size=8)
    port = free_port()
    env = {**os.environ, "ADAFACE_LOG_LEVEL": "WARNING", "ADAFACE_METRICS_PORT": "-1"}
    server = subprocess.Popen(
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
            "--gallery-path",
            str(tmp / "enroll.sqlite3"),
            "--max-stream-inflight",
            "64",
        ],
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        with GalleryClient(address, timeout=60, retries=30, backoff=0.5) as client:
            client.create_gallery("enroll")
            vectors = unit_rows(count, seed=3)
            t0 = time.perf_counter()
            n = sum(
                1
                for r in client.enroll_many(
                    "enroll", ((f"s{i}", vectors[i : i + 1]) for i in range(count)), window=64
                )
                if not isinstance(r, Exception)
            )
            stream = n / (time.perf_counter() - t0)
            unary_n = max(50, count // 10)
            t0 = time.perf_counter()
            for i in range(unary_n):
                client.enroll("enroll", f"u{i}", vectors[i : i + 1])
            unary = unary_n / (time.perf_counter() - t0)
    except grpc.RpcError as e:
        raise SystemExit(f"enrollment bench failed: {e}") from None
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    rows.append(
        f"| enrollment (1 vector each, durable ack), EnrollStream window 64 | {stream:.0f} /s | "
        f"unary sequential {unary:.0f} /s | {stream / unary:.1f}x | "
        "group commit: one fsync per batch of concurrent writes |"
    )
    print(rows[-1], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    sizes = [20_000, 100_000] if args.quick else [100_000, 1_000_000]
    started = time.perf_counter()
    rows = [
        "| scenario | ours | faiss IndexFlatIP / other | ratio (faiss / ours, >= 1 is "
        "no slower) | notes |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    search_rows(sizes, [1, 32, 256], rows)
    hnsw_rows(10_000 if args.quick else 30_000, rows)
    with tempfile.TemporaryDirectory() as tmp:
        rebuild_row(sizes[-1], rows, Path(tmp))
        enroll_rows(500 if args.quick else 3000, rows, Path(tmp))
    print(f"\n## Gallery ({time.perf_counter() - started:.0f} s)\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
