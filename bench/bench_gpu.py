"""GPU table: raw TorchScript fp32/fp16 at batch 128, and served img/s with 1, 2, 4, 8
workers for 32-image JPEG calls and single-image calls, in one run.

Prints "skipped: no CUDA device" (exit 0) without CUDA. Gallery search on the GPU is
reported as n/a: the gallery index runs on the CPU.

Usage: python bench/bench_gpu.py [--arch ir_50] [--seconds 10] [--workers 1 2 4 8]
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


def _client_process(args: tuple[str, int, int, float]) -> float:
    from bench_server import drive, jpeg_crops

    address, clients, per_call, seconds = args
    return asyncio.run(drive(address, clients, per_call, seconds, jpeg_crops(64))).images_per_s


def served(repo: Path, name: str, workers: int, per_call: int, clients: int, seconds: float,
           precision: str) -> float:  # fmt: skip
    import subprocess

    from bench_server import free_port, wait_serving

    port = free_port()
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "ADAFACE_LOG_LEVEL": "WARNING", "ADAFACE_METRICS_PORT": "-1",
           "ADAFACE_DETECTOR": "none",
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
        wait_serving(address, timeout=900)
        share = max(1, clients // CLIENT_PROCESSES)
        with multiprocessing.get_context("spawn").Pool(CLIENT_PROCESSES) as pool:
            rates = pool.map(
                _client_process, [(address, share, per_call, seconds)] * CLIENT_PROCESSES
            )
        return sum(rates)
    finally:
        server.terminate()
        server.wait(120)


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ir_50")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
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
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        repo = Path(tmp)
        name = "bench_gpu"
        export_model(None, args.arch, repo, name, max_batch_size=RAW_BATCH)
        module = torch.jit.load(str(repo / name / "1" / "model.pt"), map_location=device).eval()
        fp32 = raw_rate(module, device, "fp32", args.seconds)
        fp16 = raw_rate(module, device, "fp16", args.seconds)
        print(f"\n## Raw TorchScript, batch {RAW_BATCH} ({args.arch})\n")
        print("| precision | img/s |\n|---|---:|")
        print(f"| fp32 (TF32 off) | {fp32:.0f} |\n| fp16 (autocast) | {fp16:.0f} |")
        print("\n## Served (aligned 112x112 JPEG crops)\n")
        print("| workers | precision | 32-image calls img/s | / raw | single-image calls img/s |")
        print("|---:|---|---:|---:|---:|")
        for precision, raw in (("fp32", fp32), ("fp16", fp16)):
            for workers in args.workers:
                big = served(repo, name, workers, 32, 32, args.seconds, precision)
                single = served(repo, name, workers, 1, 256, args.seconds, precision)
                print(
                    f"| {workers} | {precision} | {big:.0f} | {big / raw:.2f} | {single:.0f} |",
                    flush=True,
                )
        print("\nGPU gallery search p50 at 1M / 10M: n/a (the gallery index runs on the CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
