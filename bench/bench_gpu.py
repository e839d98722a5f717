"""GPU table: raw TorchScript fp32/fp16 at batch 128, served img/s with 1, 2, 4, 8
workers for 32-image JPEG calls, single-image calls and 8-photo calls of raw 640x480 photos
with detection (MTCNN on the GPU too: --detect-device follows --device), and exact gallery
search on the GPU (`--gallery-device cuda`: top-10 p50 for one probe over 1M and 10M fp16
512-d vectors), in one run.

Prints "skipped: no CUDA device" (exit 0) without CUDA.

Usage: python bench/bench_gpu.py [--arch ir_50] [--seconds 10] [--workers 1 2 4 8]
       [--gallery-sizes 1000000 10000000] [--gallery-only | --no-gallery]

One server is started per (precision, workers) and serves the three kinds of calls in turn.
On a device lent for a few minutes: `--workers 1 4 --seconds 5 --no-gallery` (four server
starts; an estimated 5-6 minutes, not yet measured), and the gallery rows as a second command
(`--gallery-only`); bench/gpu_device_run.sh runs both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RAW_BATCH = 128
CLIENT_PROCESSES = 4


def raw_rate(module, device, precision: str, seconds: float) -> float:
    import numpy as np
    import torch

    from adaface_server.backends.precision import ModelRunner

    runner = ModelRunner(module, device, precision, RAW_BATCH)
    x = np.random.default_rng(0).random((RAW_BATCH, 3, 112, 112), dtype=np.float32) * 2 - 1
    for _ in range(5):
        runner(x)
    torch.cuda.synchronize(device)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runner(x)
        calls += 1
    return calls * RAW_BATCH / (time.perf_counter() - started)


def _client_process(args: tuple[str, int, int, float, bool]) -> float:
    from bench_server import drive, face_photos, jpeg_crops

    from adaface.v1 import common_pb2

    address, clients, per_call, seconds, photos = args
    if photos:
        images, alignment = face_photos(16), common_pb2.ALIGNMENT_DETECT
    else:
        images, alignment = jpeg_crops(64), common_pb2.ALIGNMENT_ALIGNED
    return asyncio.run(
        drive(address, clients, per_call, seconds, images, alignment, "bench")
    ).images_per_s


#: (images per call, concurrent clients, raw photos with detection) for each served column.
CALLS = {"big": (32, 32, False), "single": (1, 256, False), "photos": (8, 32, True)}


def served(repo: Path, name: str, workers: int, seconds: float,
           precision: str) -> dict[str, float]:  # fmt: skip
    """img/s of each CALLS kind against one server (started once for all three)."""
    import subprocess

    from bench_server import free_port, wait_serving

    port = free_port()
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "ADAFACE_LOG_LEVEL": "WARNING", "ADAFACE_METRICS_PORT": "-1",
           "ADAFACE_MTCNN_WEIGHTS": str(Path(__file__).resolve().parents[1] / ".cache" / "mtcnn"),
           "ADAFACE_GALLERY_PATH": str(repo / f"g-{port}.sqlite3")}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
         "--model-repository", str(repo), "--model", name, "--device", "cuda",
         "--precision", precision, "--workers", str(workers), "--max-queue", "16384",
         "--max-images-per-request", "64", "--threads", "2",
         "--preprocess-workers", str(max(1, cores // workers))],
        env=env,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, timeout=300, process=server)
        rates = {}
        with multiprocessing.get_context("spawn").Pool(CLIENT_PROCESSES) as pool:
            for kind, (per_call, clients, photos) in CALLS.items():
                share = max(1, clients // CLIENT_PROCESSES)
                work = [(address, share, per_call, seconds, photos)] * CLIENT_PROCESSES
                rates[kind] = sum(pool.map(_client_process, work))
        return rates
    finally:
        server.terminate()
        server.wait(120)


GALLERY_DIM = 512
GALLERY_K = 10
GALLERY_BLOCK = 1 << 20  # vectors made, and applied to the index, per step


def gallery_search_rows(device, sizes: list[int], searches: int) -> list[str]:
    """Top-10 p50 / p90 for single probes through ExactIndex.search (identity aggregation
    and fp32 rescoring included) with the index on `device`, fp16 on host and device."""
    import numpy as np
    import torch

    from adaface_server.gallery.index import Change, ExactIndex

    out = []
    for n in sizes:
        index = ExactIndex(GALLERY_DIM, dtype="float16", capacity=n, device=str(device))
        gen = torch.Generator(device=device).manual_seed(n)
        near = []
        t0 = time.perf_counter()
        for s in range(0, n, GALLERY_BLOCK):
            m = min(GALLERY_BLOCK, n - s)
            block = torch.randn((m, GALLERY_DIM), device=device, generator=gen)
            block = torch.nn.functional.normalize(block, dim=1).half().cpu().numpy()
            keys = np.arange(s + 1, s + m + 1, dtype=np.int64)
            names = {int(i): f"id{i}" for i in keys}  # one sample per identity
            index.apply([Change(add_keys=keys, add_labels=keys, add_vectors=block,
                                names=names, identity_delta=m)])  # fmt: skip
            near.append(block[:: max(1, m // 64)][:64].astype(np.float32))
        build = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        pool = np.concatenate(near)
        probes = pool + 0.05 * rng.standard_normal(pool.shape).astype(np.float32)
        probes /= np.linalg.norm(probes, axis=1, keepdims=True)
        for p in probes[:5]:
            index.search(p[None], GALLERY_K, None)  # warm
        times = []
        for i in range(searches):
            p = probes[i % len(probes)][None]
            t = time.perf_counter()
            hits, _ = index.search(p, GALLERY_K, None)
            times.append(time.perf_counter() - t)
            assert len(hits[0]) == GALLERY_K
        p50, p90 = np.percentile(times, [50, 90]) * 1000
        gib = index.device_bytes() / 2**30
        same = sum(_same_as_brute_force(index, p, device) for p in probes[:5])
        out.append(
            f"| {n / 1e6:g}M x {GALLERY_DIM} fp16 | {p50:.2f} | {p90:.2f} | {gib:.1f} | "
            f"{build:.0f} | {same}/5 |"
        )
        print(out[-1], flush=True)
        del index
        torch.cuda.empty_cache()
    return out


def _same_as_brute_force(index, probe, device) -> bool:
    """The index's top-10 identities equal an fp32 scan of every stored vector (read from
    the device copy, which holds the host's fp16 values: nothing is uploaded again)."""
    import torch

    snap = index.snapshot
    samples, stored = snap.samples, snap.device_samples.matrix  # the same fp16 values
    p = torch.from_numpy(probe).to(device)
    scores = torch.cat(
        [stored[s : s + GALLERY_BLOCK].float() @ p for s in range(0, samples.n, GALLERY_BLOCK)]
    )
    rows = torch.topk(scores, GALLERY_K).indices.cpu().numpy()
    hits, _ = index.search(probe[None], GALLERY_K, None)
    return [h.label for h in hits[0]] == (samples.keys[rows]).tolist()


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ir_50")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--gallery-sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--gallery-searches", type=int, default=200)
    parser.add_argument("--gallery-only", action="store_true", help="only the gallery search rows")
    parser.add_argument("--no-gallery", action="store_true", help="no gallery search rows")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device")
        return 0
    logging.basicConfig(level=logging.ERROR)
    from adaface_server.backends.precision import exact_fp32_on_cuda
    from adaface_server.models.export import export_model

    device = torch.device("cuda")
    exact_fp32_on_cuda(device)
    print(f"{torch.cuda.get_device_name(device)}, {len(os.sched_getaffinity(0))} cores")
    if args.gallery_only:
        print_gallery(device, args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        repo = Path(tmp)
        name = "bench_gpu"
        export_model(None, args.arch, repo, name, max_batch_size=RAW_BATCH)
        module = torch.jit.load(str(repo / name / "1" / "model.pt"), map_location=device).eval()
        fp32 = raw_rate(module, device, "fp32", args.seconds)
        fp16 = raw_rate(module, device, "fp16", args.seconds)
        print(f"\n## Raw TorchScript, batch {RAW_BATCH} ({args.arch})\n")
        print("| precision | img/s |\n|---|---:|")
        print(f"| fp32 (TF32 off) | {fp32:.0f} |\n| fp16 (autocast) | {fp16:.0f} |", flush=True)
        print("\n## Served (aligned 112x112 JPEG crops)\n")
        print(
            "| workers | precision | 32-image calls img/s | / raw | single-image calls img/s "
            "| 8-photo DETECT calls img/s | photos / crops |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|")
        for precision, raw in (("fp32", fp32), ("fp16", fp16)):
            for workers in args.workers:
                rates = served(repo, name, workers, args.seconds, precision)
                big, single, found = rates["big"], rates["single"], rates["photos"]
                print(
                    f"| {workers} | {precision} | {big:.0f} | {big / raw:.2f} | {single:.0f} "
                    f"| {found:.0f} | {found / big:.2f} |",
                    flush=True,
                )
    if not args.no_gallery:
        print_gallery(device, args)
    return 0


def print_gallery(device, args: argparse.Namespace) -> None:
    print(f"\n## Gallery search on the GPU (--gallery-device cuda), top-{GALLERY_K}, 1 probe\n")
    print("| gallery | p50 ms | p90 ms | device GiB | build s | top-10 = fp32 scan |")
    print("|---|---:|---:|---:|---:|---:|")
    gallery_search_rows(device, args.gallery_sizes, args.gallery_searches)


if __name__ == "__main__":
    sys.exit(main())
