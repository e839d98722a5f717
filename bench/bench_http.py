"""HTTP/JSON vs gRPC latency for the same Embed, measured in one run against one server.

Starts a real `adaface-server` subprocess with both transports (--http-port), then sends the
same single-image Embed (one pre-aligned 112x112 JPEG crop) over gRPC (grpc.aio) and over
HTTP (aiohttp client, keep-alive): base64 JSON with float-array vectors, base64 JSON with
?vector_format=base64, and a multipart upload. Calls alternate between the variants, one at a
time, so every variant sees the same machine load; the table gives each variant's median and
p90 and its ratio to gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, jpeg_crops, wait_serving


async def measure(address: str, http_url: str, rounds: int) -> dict[str, list[float]]:
    crop = jpeg_crops(1)[0]
    aligned = common_pb2.ALIGNMENT_ALIGNED
    grpc_request = embedder_pb2.EmbedRequest(
        images=[common_pb2.ImageInput(encoded=crop, alignment=aligned)]
    )
    body = {"images": [{"encoded": base64.b64encode(crop).decode()}]}
    times: dict[str, list[float]] = {}
    async with (
        grpc.aio.insecure_channel(address) as channel,
        aiohttp.ClientSession() as session,
    ):
        stub = embedder_pb2_grpc.EmbedderStub(channel)

        async def grpc_call() -> None:
            reply = await stub.Embed(grpc_request)
            assert reply.results[0].HasField("embedding")

        async def json_call(query: str = "") -> None:
            async with session.post(f"{http_url}/v1/embed{query}", json=body) as response:
                assert response.status == 200, await response.text()
                await response.json()

        async def grpc_info() -> None:
            await stub.Info(embedder_pb2.InfoRequest())

        async def http_info() -> None:
            async with session.get(f"{http_url}/v1/info") as response:
                assert response.status == 200, await response.text()
                await response.json()

        async def form_call() -> None:
            form = aiohttp.FormData()
            form.add_field("image", crop, filename="crop.jpg")
            async with session.post(f"{http_url}/v1/embed", data=form) as response:
                assert response.status == 200, await response.text()
                await response.json()

        variants = {
            "gRPC Embed": grpc_call,
            "HTTP JSON, float-array vectors": json_call,
            "HTTP JSON, ?vector_format=base64": lambda: json_call("?vector_format=base64"),
            "HTTP multipart upload": form_call,
            # No model work: what each transport alone costs per call.
            "gRPC Info": grpc_info,
            "HTTP Info": http_info,
        }
        for call in variants.values():  # warm connections and the model's batch shape
            for _ in range(5):
                await call()
        for _ in range(rounds):
            for name, call in variants.items():
                t0 = time.perf_counter()
                await call()
                times.setdefault(name, []).append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ir_18")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from adaface_server.models.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        name = "bench_" + args.arch.replace("_", "")
        export_model(None, args.arch, repo, name, max_batch_size=8)
        port, http_port = free_port(), free_port()
        env = {**os.environ, "ADAFACE_LOG_LEVEL": "WARNING"}
        weights = Path(__file__).resolve().parents[1] / ".cache" / "mtcnn"
        env.setdefault("ADAFACE_MTCNN_WEIGHTS", str(weights))
        env.setdefault("ADAFACE_GALLERY_PATH", str(repo / "galleries.sqlite3"))
        env.setdefault("ADAFACE_METRICS_PORT", "-1")
        command = [sys.executable, "-m", "adaface_server", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--http-port", str(http_port)]
        command += ["--model-repository", str(repo), "--model", name]
        command += ["--threads", str(args.threads)]
        server = subprocess.Popen(command, env=env)
        try:
            wait_serving(f"127.0.0.1:{port}", process=server)
            times = asyncio.run(
                measure(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", args.rounds)
            )
        finally:
            server.terminate()
            server.wait(30)
    base = {"Embed": float(np.median(times["gRPC Embed"]))}
    base["Info"] = float(np.median(times["gRPC Info"]))
    print(
        f"Embed, 1 aligned 112x112 JPEG, {args.arch}, 1 client, {args.rounds} calls per variant "
        f"(interleaved), {os.cpu_count()} CPUs"
    )
    print(f"{'variant':36s} {'p50 ms':>8s} {'p90 ms':>8s} {'vs gRPC':>11s} {'+ms':>7s}")
    for name, samples in times.items():
        ms = np.asarray(samples) * 1000
        p50 = float(np.median(ms))
        grpc_p50 = base["Info" if name.endswith("Info") else "Embed"] * 1000
        print(
            f"{name:36s} {p50:8.2f} {np.percentile(ms, 90):8.2f} "
            f"{p50 / grpc_p50:10.2f}x {p50 - grpc_p50:+7.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
