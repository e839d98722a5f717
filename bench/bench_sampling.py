"""kNN graph over identity prototypes (k=15, 512-d): tiles, the full matrix, faiss, one run.

Each method runs in a fresh subprocess, so its peak memory is its own: the figure is the
peak resident set during the kNN minus the resident set just before it (the prototypes
themselves, N*512*4 bytes, are in that baseline). Recall@15 is against the exact neighbours
of a seeded sample of 1000 rows (brute force), so it is measured at any N. The
full-matrix version is what the seed does (an N x N distance matrix, then topk); it is
skipped where N*N*4 bytes exceed the free memory.

Then the goal rows: CPU exact (the server's default, --sampling-knn-method auto) at the
largest of --sizes against faiss flat; CPU approximate (faiss IVF) at --approx-size within
15 minutes with recall >= 0.95; GPU tiles at --gpu-size within 60 s (skipped without CUDA).

    python bench/bench_sampling.py [--sizes 10000,100000] [--approx-size 1000000]
                                   [--gpu-size 1000000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 15  # batch_size 64 / num_instance 4 = 16 identities per batch
DIM = 512
METHODS = ("ours fp32", "ours bf16", "full matrix", "faiss flat", "faiss ivf")
SAMPLE = 1000  # rows whose exact neighbours measure recall


def prototypes(n: int) -> np.ndarray:
    """Clustered unit vectors, like the identities of a face dataset (seeded)."""
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((max(2, n // 20), DIM), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.7 * rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(method: str, n: int, out: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    x = prototypes(n)
    if method.startswith("faiss") or method == "server exact":
        import faiss

        faiss.omp_set_num_threads(threads)
    from adaface_server.config import Settings
    from adaface_server.sampling import neighbours
    from adaface_server.sampling.knn import knn
    from adaface_server.sampling.knn_faiss import knn_faiss

    knn(x[:64], 2, device="cuda" if method == "gpu tiles" else "cpu")  # warm up, unmeasured
    baseline = _status_kib("VmRSS")
    # Resets the peak (VmHWM) to the current RSS, Linux >= 4.0.
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if method.startswith("ours"):
        idx, _ = knn(x, K, precision=method.split()[1])
    elif method == "gpu tiles":
        idx, _ = knn(x, K, block=neighbours.GPU_MIN_BLOCK, device="cuda")
    elif method == "server exact":
        settings = Settings(sampling_knn_device="cpu")
        idx = neighbours.neighbours(x, K, neighbours.resolve(settings), settings)
    elif method == "faiss ivf":
        idx, _ = knn_faiss(x, K, method="ivf")
    elif method == "full matrix":
        t = torch.from_numpy(x)
        sims = t @ t.T
        sims.fill_diagonal_(-torch.inf)
        idx = torch.topk(sims, K, dim=1).indices.numpy()
    else:
        index = faiss.IndexFlatIP(DIM)
        index.add(x)
        _, found = index.search(x, K + 1)
        # Drop each row itself (normally first; not always, with exact duplicates).
        keep = found != np.arange(n)[:, None]
        idx = np.stack([row[m][:K] for row, m in zip(found, keep, strict=True)])
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    np.save(out, idx.astype(np.int64))
    print(json.dumps({"seconds": seconds, "peak_mib": (peak - baseline) / 1024}))


def run(method: str, n: int, out: Path, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", method, str(n), str(out), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def sample_truth(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, their exact k nearest) for a seeded sample of rows (brute force)."""
    x = prototypes(n)
    rows = np.sort(np.random.default_rng(1).choice(n, min(n, SAMPLE), replace=False))
    truth = np.empty((rows.size, K), np.int64)
    for start in range(0, rows.size, 100):
        part = rows[start : start + 100]
        sims = x[part] @ x.T
        sims[np.arange(part.size), part] = -np.inf
        truth[start : start + part.size] = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    return rows, truth


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--approx-size", type=int, default=1_000_000, help="0: skip the row")
    parser.add_argument("--gpu-size", type=int, default=1_000_000, help="0: skip the row")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return 0
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        import faiss  # noqa: F401

        methods = METHODS
    except ImportError:
        print("faiss not installed: `pip install -c constraints.txt faiss-cpu`; rows skipped")
        methods = METHODS[:3]
    import torch

    cuda = torch.cuda.is_available()
    rows: list[str] = []
    goals: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:

        def measure(method: str, n: int, truth: tuple[np.ndarray, np.ndarray]) -> dict:
            out = Path(tmp) / f"{method.replace(' ', '_')}_{n}.npy"
            r = run(method, n, out, args.threads)
            r["recall"] = recall(np.load(out)[truth[0]], truth[1])
            return r

        for n in sizes:
            truth = sample_truth(n)
            results: dict[str, dict] = {}
            for method in methods:
                need = n * n * 4
                if method == "full matrix" and need > 0.8 * available_bytes():
                    results[method] = {"skipped": f"needs {need / 2**30:.0f} GiB for N x N"}
                else:
                    results[method] = measure(method, n, truth)
                r, base = results[method], results["ours fp32"]
                if "skipped" in r:
                    rows.append(f"| {n:,} | {method} | skipped: {r['skipped']} | | | |")
                else:
                    rows.append(
                        f"| {n:,} | {method} | {r['seconds']:.2f} | "
                        f"{base['seconds'] / r['seconds']:.2f}x | {r['peak_mib']:,.0f} | "
                        f"{r['recall']:.3f} |"
                    )
                print(rows[-1], flush=True)
        n = max(sizes)
        if "faiss flat" in methods:
            truth = sample_truth(n)
            ours, flat = measure("server exact", n, truth), measure("faiss flat", n, truth)
            ratio = flat["seconds"] / ours["seconds"]
            goals.append(
                f"| CPU exact (server default) at {n:,} | no slower than faiss flat | "
                f"{ours['seconds']:.1f} s vs {flat['seconds']:.1f} s: {ratio:.2f}x, recall "
                f"{ours['recall']:.3f} | {'met' if ratio >= 0.95 else 'NOT met'} |"
            )
            print(goals[-1], flush=True)
        if args.approx_size and "faiss ivf" in methods:
            truth = sample_truth(args.approx_size)
            r = measure("faiss ivf", args.approx_size, truth)
            ok = r["seconds"] <= 900 and r["recall"] >= 0.95
            goals.append(
                f"| CPU approximate (faiss IVF) at {args.approx_size:,} | <= 900 s, recall@15 "
                f">= 0.95 | {r['seconds']:.1f} s, recall {r['recall']:.3f}, "
                f"{r['peak_mib']:,.0f} MiB | {'met' if ok else 'NOT met'} |"
            )
            print(goals[-1], flush=True)
        if args.gpu_size and cuda:
            truth = sample_truth(args.gpu_size)
            r = measure("gpu tiles", args.gpu_size, truth)
            ok = r["seconds"] <= 60 and r["recall"] >= 0.999
            goals.append(
                f"| GPU exact (tiles) at {args.gpu_size:,} | <= 60 s | {r['seconds']:.1f} s, "
                f"recall {r['recall']:.3f} | {'met' if ok else 'NOT met'} |"
            )
        elif args.gpu_size:
            goals.append(
                f"| GPU exact (tiles) at {args.gpu_size:,} | <= 60 s | skipped | no CUDA |"
            )
    print(f"\nkNN graph, k={K}, {DIM}-d float32 prototypes, {args.threads} threads")
    print("| prototypes | method | seconds | speed vs ours fp32 | peak extra MiB | recall@15 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| goal | target | measured | |")
    print("|---|---|---|---|")
    print("\n".join(goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
