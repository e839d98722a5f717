"""Server throughput and latency vs the raw model, measured back to back in one run.

Starts a real `adaface-server` subprocess on the embedded TorchScript backend, drives it from
this process with grpc.aio clients sending pre-aligned 112x112 JPEG crops, and divides the
server's images/s by the raw TorchScript images/s at the same batch size and thread count.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import raw_throughput


@dataclass
class Row:
    scenario: str
    images_per_s: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_crops(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=95
        )
        out.append(buf.getvalue())
    return out


def wait_serving(
    address: str, timeout: float = 300.0, process: subprocess.Popen | None = None
) -> None:
    """Waits for the server's health to say SERVING; with `process`, fails as soon as the
    server process has exited (a refused start-up) instead of waiting out the timeout."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(
                    f"the server for {address} exited with status {process.returncode} "
                    "before serving (its log above says why)"
                )
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} did not become SERVING")


async def drive(
    address: str,
    clients: int,
    images_per_call: int,
    seconds: float,
    crops: list[bytes],
    alignment: int = common_pb2.ALIGNMENT_ALIGNED,
    label: str = "",
) -> Row:
    latencies: list[float] = []
    images = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        requests = [
            embedder_pb2.EmbedRequest(
                images=[
                    common_pb2.ImageInput(encoded=crops[(i + k) % len(crops)], alignment=alignment)
                    for k in range(images_per_call)
                ]
            )
            for i in range(len(crops))
        ]
        # Warm the channel and the server's batch shapes before timing.
        await asyncio.gather(*(stub.Embed(requests[i]) for i in range(clients)))
        stop_at = time.perf_counter() + seconds

        async def client(offset: int) -> None:
            nonlocal images
            i = offset
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await stub.Embed(requests[i % len(requests)])
                latencies.append(time.perf_counter() - t0)
                images += images_per_call
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    label = label or f"{clients} client(s) x {images_per_call} image(s)/call"
    return Row(
        label, images / elapsed, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    )


def face_photos(n: int) -> list[bytes]:
    """640x480 JPEG photos with one real face (scikit-image's astronaut) at varying places."""
    import skimage.data

    face = Image.fromarray(skimage.data.astronaut()).resize((320, 320))
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        canvas = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
        canvas.paste(face, (int(rng.integers(0, 320)), int(rng.integers(0, 160))))
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run(
    arch: str = "ir_50", batch_size: int = 8, threads: int = 2, seconds: float = 8.0
) -> tuple[float, list[Row]]:
    from adaface_server.models.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        name = "bench_" + arch.replace("_", "")
        export_model(None, arch, repo, name, max_batch_size=batch_size)
        model_path = repo / name / "1" / "model.pt"
        raw = raw_throughput(model_path, batch_size=batch_size, threads=threads, seconds=seconds)

        port = free_port()
        env = {**os.environ, "ADAFACE_LOG_LEVEL": "WARNING"}
        weights = Path(__file__).resolve().parents[1] / ".cache" / "mtcnn"
        env.setdefault("ADAFACE_MTCNN_WEIGHTS", str(weights))
        env.setdefault("ADAFACE_GALLERY_PATH", str(repo / "galleries.sqlite3"))
        env.setdefault("ADAFACE_METRICS_PORT", "-1")  # never collide with a running server
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
                name,
                "--threads",
                str(threads),
                "--max-batch-size",
                str(batch_size),
                "--max-queue",
                "4096",
                # raw_throughput above is fp32: compare like with like (bench_hardware.py
                # compares precisions)
                "--precision",
                "fp32",
            ],
            env=env,
        )
        address = f"127.0.0.1:{port}"
        try:
            wait_serving(address, process=server)
            crops = jpeg_crops(64)
            rows = []
            for clients, per_call in ((1, 1), (8, 1), (32, 1), (4, 8), (4, 32)):
                rows.append(asyncio.run(drive(address, clients, per_call, seconds, crops)))
            # Raw photos: MTCNN detection + alignment + embedding, same clients as row 4.
            rows.append(
                asyncio.run(
                    drive(
                        address,
                        4,
                        8,
                        seconds,
                        face_photos(16),
                        common_pb2.ALIGNMENT_DETECT,
                        "4 client(s) x 8 640x480 photo(s)/call, DETECT",
                    )
                )
            )
        finally:
            server.terminate()
            server.wait(30)
    return raw, rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ir_50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    raw, rows = run(args.arch, args.batch_size, args.threads, args.seconds)
    print(
        f"\n## Server vs raw model ({args.arch}, batch {args.batch_size}, "
        f"{args.threads} threads, {os.cpu_count()} CPUs)\n"
    )
    print(f"raw TorchScript: {raw:.1f} img/s\n")
    print("| clients | img/s | p50 ms | p99 ms | server/raw |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.scenario} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.images_per_s / raw:.2f} |"
        )
    detect, aligned = rows[-1], rows[3]
    print(
        "\nraw photos with detection / pre-aligned crops (4 clients x 8 images): "
        f"{detect.images_per_s / aligned.images_per_s:.2f}"
    )


if __name__ == "__main__":
    main()
