"""Server->Triton vs server->embedded vs Triton direct, measured back to back in one run.

One exported model, three paths, the same pre-aligned 112x112 JPEG crops:
  * embedded: adaface-server --backend torchscript (our batcher, in-process TorchScript);
  * triton:   adaface-server --backend triton -> a real tritonserver (Triton's batcher);
  * direct:   tritonclient.grpc.aio straight to that tritonserver with the same images,
              already preprocessed (what Triton costs without our server in front).
The tritonserver is the one bundled in nvidia-pytriton (python backend only), so Triton runs
the exporter's python-backend twin: same TorchScript file and thread count as embedded. On a
GPU box with the NGC image the libtorch model would be measured instead. Skips with a message
when no tritonserver binary can be installed.

Then the same weights exported with `--input-dtype uint8` (pixels in, normalised inside the
graph) go through a second tritonserver: bytes per image of the KServe ModelInferRequest
and img/s, direct and through the server, against the fp32-input model.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_server import Row, drive, free_port, jpeg_crops, wait_serving  # noqa: E402

SCENARIOS = ((16, 1), (4, 8))  # (concurrent clients, images per call)
WIRE_IMAGES = 8  # images per request when measuring bytes per image on the wire


def start_server(repo: Path, name: str, threads: int, batch: int, *extra: str):
    port = free_port()
    command = [
        sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
        "--model-repository", str(repo), "--model", name, "--threads", str(threads),
        "--max-batch-size", str(batch), "--max-queue", "4096", *extra,
    ]  # fmt: skip
    # A gallery file of its own: the default one may be locked by another running server.
    env = {
        **os.environ,
        "ADAFACE_LOG_LEVEL": "WARNING",
        "ADAFACE_GALLERY_PATH": str(repo.parent / f"galleries-{port}.sqlite3"),
        "ADAFACE_METRICS_PORT": "-1",  # never collide with a running server
    }
    process = subprocess.Popen(command, env=env)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, process=process)
    except BaseException:
        process.terminate()
        process.wait(30)
        raise
    return process, address


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(30)


def measure_server(address: str, seconds: float, crops: list[bytes]) -> list[Row]:
    return [asyncio.run(drive(address, c, k, seconds, crops)) for c, k in SCENARIOS]


def wire_bytes_per_image(inputs: np.ndarray) -> float:
    """Serialised size of a ModelInferRequest carrying WIRE_IMAGES rows, per image."""
    from tritonclient.grpc import service_pb2

    rows = np.ascontiguousarray(inputs[:WIRE_IMAGES])
    datatype = "UINT8" if rows.dtype == np.uint8 else "FP32"
    request = service_pb2.ModelInferRequest(model_name="m", raw_input_contents=[rows.tobytes()])
    request.inputs.add(name="INPUT__0", datatype=datatype, shape=list(rows.shape))
    return request.ByteSize() / len(rows)


async def drive_direct(
    url: str, name: str, clients: int, per_call: int, seconds: float, inputs: np.ndarray
) -> Row:
    import tritonclient.grpc.aio as aio
    from tritonclient.grpc import InferInput, InferRequestedOutput

    client = aio.InferenceServerClient(url)
    outputs = [InferRequestedOutput("OUTPUT__0"), InferRequestedOutput("OUTPUT__1")]
    latencies: list[float] = []
    images = 0

    def request(i: int) -> list:
        rows = np.take(inputs, range(i, i + per_call), axis=0, mode="wrap")
        datatype = "UINT8" if rows.dtype == np.uint8 else "FP32"
        tensor = InferInput("INPUT__0", list(rows.shape), datatype)
        tensor.set_data_from_numpy(np.ascontiguousarray(rows))
        return [tensor]

    async def call(i: int) -> None:
        result = await client.infer(name, request(i), outputs=outputs)
        result.as_numpy("OUTPUT__0")

    try:
        await asyncio.gather(*(call(i) for i in range(clients)))  # warm-up
        stop_at = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal images
            i = offset
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                await call(i)
                latencies.append(time.perf_counter() - t0)
                images += per_call
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    lat = np.array(latencies) * 1000
    return Row(
        f"{clients} client(s) x {per_call} image(s)/call",
        images / elapsed,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
    )


def run(
    arch: str, batch: int, threads: int, seconds: float
) -> tuple[dict[str, list[Row]], dict[str, float]] | None:
    from adaface_server.models.export import export_model, export_python_backend
    from adaface_server.preprocess.pipeline import to_model_input
    from tests.integration.triton_harness import (
        TritonProcess,
        TritonUnavailable,
        find_tritonserver,
    )

    try:
        install = find_tritonserver()
    except TritonUnavailable as exc:
        print(f"SKIPPED: no tritonserver binary ({exc})")
        return None
    crops = jpeg_crops(64)
    pixels = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in crops]
    inputs = to_model_input(pixels, flip=False)
    inputs_u8 = to_model_input(pixels, flip=False, dtype="uint8")
    wire = {"fp32": wire_bytes_per_image(inputs), "uint8": wire_bytes_per_image(inputs_u8)}
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo, twin = Path(tmp) / "repo", Path(tmp) / "twin"
        repo_u8, twin_u8 = Path(tmp) / "repo_u8", Path(tmp) / "twin_u8"
        name = "bench_" + arch.replace("_", "")
        export_model(None, arch, repo, name, max_batch_size=batch)
        export_python_backend(repo, name, twin, threads=threads)
        export_model(None, arch, repo_u8, name, max_batch_size=batch, input_dtype="uint8")
        export_python_backend(repo_u8, name, twin_u8, threads=threads)

        server, address = start_server(repo, name, threads, batch)
        try:
            results["server -> embedded"] = measure_server(address, seconds, crops)
        finally:
            stop(server)

        for suffix, model_repo, twin_repo, batch_inputs, log in (
            ("", repo, twin, inputs, "triton.log"),
            (" (uint8)", repo_u8, twin_u8, inputs_u8, "triton_u8.log"),
        ):
            triton = TritonProcess(twin_repo, Path(tmp) / log, install).start()
            try:
                results[f"Triton direct{suffix}"] = [
                    asyncio.run(drive_direct(triton.url, name, c, k, seconds, batch_inputs))
                    for c, k in SCENARIOS
                ]
                server, address = start_server(
                    model_repo, name, threads, batch, "--backend", "triton",
                    "--triton-url", triton.url,
                )  # fmt: skip
                try:
                    results[f"server -> Triton{suffix}"] = measure_server(address, seconds, crops)
                finally:
                    stop(server)
            finally:
                triton.stop()
    return results, wire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ir_50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    ran = run(args.arch, args.batch_size, args.threads, args.seconds)
    if ran is None:
        return
    results, wire = ran
    print(
        f"\n## Server->Triton vs server->embedded vs Triton direct ({args.arch}, max batch "
        f"{args.batch_size}, {args.threads} model threads, {os.cpu_count()} CPUs)\n"
    )
    print("| path | clients | img/s | p50 ms | p99 ms | / embedded | / Triton direct |")
    print("|---|---|---:|---:|---:|---:|---:|")
    embedded = results["server -> embedded"]
    direct = results["Triton direct"]
    paths = (
        "server -> embedded",
        "server -> Triton",
        "server -> Triton (uint8)",
        "Triton direct",
        "Triton direct (uint8)",
    )
    for path in paths:
        for i, row in enumerate(results[path]):
            print(
                f"| {path} | {row.scenario} | {row.images_per_s:.1f} | {row.p50_ms:.1f} | "
                f"{row.p99_ms:.1f} | {row.images_per_s / embedded[i].images_per_s:.2f} | "
                f"{row.images_per_s / direct[i].images_per_s:.2f} |"
            )

    print(
        f"\n## Triton model input: fp32 vs uint8 ({args.arch}; bytes per image of a "
        f"{WIRE_IMAGES}-image ModelInferRequest)\n"
    )
    print("| input | bytes/image | " + " | ".join(f"{r.scenario} img/s" for r in direct) + " |")
    print("|---|---:|" + "---:|" * len(direct))
    for dtype, suffix in (("fp32", ""), ("uint8", " (uint8)")):
        for path in ("Triton direct", "server -> Triton"):
            rates = " | ".join(f"{r.images_per_s:.1f}" for r in results[path + suffix])
            print(f"| {dtype}, {path} | {wire[dtype]:,.0f} | {rates} |")


if __name__ == "__main__":
    main()
