"""kNN graph over identity prototypes (k=15, 512-d): ours vs the full matrix vs faiss, one run.

Each method runs in a fresh subprocess, so its peak memory is its own: the figure is the
peak resident set during the kNN minus the resident set just before it (the prototypes
themselves, N*512*4 bytes, are in that baseline). Recall is against the exact fp32 result.
The full-matrix version is what the seed does (an N x N distance matrix, then topk); it is
skipped where N*N*4 bytes exceed the free memory.

    python bench/bench_sampling.py [--sizes 10000,100000] [--threads 2]
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
METHODS = ("ours fp32", "ours bf16", "full matrix", "faiss flat")


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
    if method == "faiss flat":
        import faiss

        faiss.omp_set_num_threads(threads)
    from adaface_server.sampling.knn import knn

    knn(x[:64], 2)  # load kernels outside the measurement
    baseline = _status_kib("VmRSS")
    # Resets the peak (VmHWM) to the current RSS, Linux >= 4.0.
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    if method.startswith("ours"):
        idx, _ = knn(x, K, precision=method.split()[1])
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
        print("faiss not installed: `pip install -c constraints.txt faiss-cpu`; row skipped")
        methods = METHODS[:3]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results: dict[str, dict] = {}
            for method in methods:
                need = n * n * 4
                if method == "full matrix" and need > 0.8 * available_bytes():
                    results[method] = {"skipped": f"needs {need / 2**30:.0f} GiB for N x N"}
                    continue
                out = Path(tmp) / f"{method.replace(' ', '_')}_{n}.npy"
                results[method] = run(method, n, out, args.threads)
                results[method]["idx"] = out
            truth = np.load(results["ours fp32"]["idx"])
            base = results["ours fp32"]["seconds"]
            for method in methods:
                r = results[method]
                if "skipped" in r:
                    rows.append(f"| {n:,} | {method} | skipped: {r['skipped']} | | | |")
                    continue
                rec = recall(np.load(r["idx"]), truth)
                rows.append(
                    f"| {n:,} | {method} | {r['seconds']:.2f} | {base / r['seconds']:.2f}x | "
                    f"{r['peak_mib']:,.0f} | {rec:.3f} |"
                )
                print(rows[-1], flush=True)
    print(f"\nkNN graph, k={K}, {DIM}-d float32 prototypes, {args.threads} threads")
    print("| prototypes | method | seconds | speed vs ours fp32 | peak extra MiB | recall@15 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
