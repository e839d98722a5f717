"""Precision and worker processes: raw runtimes and served throughput, measured in one run.

Rows:
- raw runtimes at one batch size (interleaved rounds, median): the exported TorchScript in
  fp32, the same file under torch.autocast bf16 (what the server runs for bf16), a
  bf16 export (`adaface-export --precision bf16`) and, as a peer the server does not run,
  the same weights under torch.compile (inductor, frozen) and autocast bf16 (--no-compile
  leaves it out), ONNX Runtime fp32 (when onnxruntime and onnx are installed: the [bench]
  extra), and the OpenVINO IR (`adaface-export --openvino`) compiled in fp32 and bf16; min
  cosine and max relative norm error against TorchScript fp32 on the exporter's verification
  batch;
- a real server subprocess on TorchScript at --precision fp32 and bf16 and on OpenVINO bf16
  (4 clients x 8 aligned JPEG crops per call), and served bf16 / fastest raw bf16 (every
  bf16 row above, peers included);
- raw 640x480 photos with detection (MTCNN, same clients) against those aligned crops, per
  precision: the issue's goal is >= 0.5x;
- --workers 1 (all cores as intra-op threads) vs --workers 2 (cores / 2 each), at the
  runtime and precision `auto` picks, for aligned crops and (unless --no-photos) for raw
  photos with detection.

Usage: python bench/bench_hardware.py [--arch ir_50] [--seconds 6] [--rounds 3]
       [--no-compile] [--no-photos] [--no-workers]
Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import drive, face_photos, free_port, jpeg_crops, wait_serving

from adaface.v1 import common_pb2
from adaface_server.backends.precision import ModelRunner, cpu_supports_bf16, parity
from adaface_server.models.export import export_model, verification_batch

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def compiled_bf16(arch: str, seed: int = 0):
    """The exported weights as an eager model under torch.compile (inductor, frozen weights)
    and autocast bf16: the fastest CPU peer the issue measured. None when it cannot compile."""
    from adaface_server.models.formats import get_format

    fmt = get_format("adaface")
    model = fmt.build(arch)
    model.load_state_dict(fmt.random_weights(arch, seed), strict=True)
    model = model.eval().to(memory_format=torch.channels_last)
    torch._inductor.config.freezing = True
    compiled = torch.compile(model)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            embeddings, norms = compiled(x)
        embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
        return embeddings.numpy(), norms.float().numpy()

    try:
        started = time.perf_counter()
        run(verification_batch(8).numpy())
        print(f"torch.compile of {arch} took {time.perf_counter() - started:.0f} s")
    except Exception as exc:  # no C++ compiler, an inductor gap: the row is left out
        print(f"torch.compile peer unavailable: {type(exc).__name__}: {exc}"[:300])
        return None
    return run


def onnxruntime_fp32(arch: str, threads: int, seed: int = 0) -> Runner | None:
    """The same weights exported to ONNX (TorchScript-based exporter, offline) under ONNX
    Runtime's CPU provider; None, with the reason printed, when it cannot run here."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        print(f"ONNX Runtime peer unavailable: {exc} (install the [bench] extra)")
        return None
    from adaface_server.models.formats import get_format

    fmt = get_format("adaface")
    model = fmt.build(arch)
    model.load_state_dict(fmt.random_weights(arch, seed), strict=True)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (verification_batch(2),), buffer, dynamo=False,
                input_names=["INPUT__0"], output_names=["OUTPUT__0", "OUTPUT__1"],
                dynamic_axes={"INPUT__0": {0: "batch"}}, opset_version=17,
            )  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            buffer.getvalue(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # no onnx package, an exporter gap: the row is left out
        print(f"ONNX Runtime peer unavailable: {type(exc).__name__}: {exc}"[:300])
        return None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings, norms = session.run(None, {"INPUT__0": batch})
        return embeddings, norms

    return run


def openvino_runners(repo: Path, name: str, threads: int) -> dict[str, Runner]:
    """The exported IR compiled in fp32 and (with native bf16) bf16, as the server runs it."""
    try:
        from adaface_server.backends.openvino import OpenVINORunner
        from adaface_server.backends.openvino import cpu_supports_bf16 as ov_bf16
        from adaface_server.models.openvino_export import compile_ir
    except ImportError as exc:
        print(f"OpenVINO rows unavailable: {exc}")
        return {}
    xml = repo / f"{name}_openvino" / "1" / "model.xml"
    precisions = ["fp32", "bf16"] if ov_bf16() else ["fp32"]
    return {
        f"OpenVINO {p} (--runtime openvino)": OpenVINORunner(compile_ir(xml, p, threads), p)
        for p in precisions
    }


def raw_rows(
    repo: Path,
    names: dict[str, str],
    batch: int,
    threads: int,
    seconds: float,
    rounds: int,
    peers: dict[str, Runner],
) -> list[tuple[str, float, float, float]]:
    """(runtime, median img/s, min cosine vs fp32, max rel norm error) per runtime."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")

    def load(name: str) -> torch.jit.ScriptModule:
        return torch.jit.load(str(repo / name / "1" / "model.pt"), map_location=cpu).eval()

    runners = {
        "TorchScript fp32": ModelRunner(load(names["fp32"]), cpu, "fp32", batch),
        "TorchScript fp32 file under autocast bf16 (server bf16)": ModelRunner(
            load(names["fp32"]), cpu, "bf16", batch
        ),
        "bf16 export (adaface-export --precision bf16)": ModelRunner(
            load(names["bf16"]), cpu, "fp32", batch
        ),
    }
    runners.update(peers)
    check = verification_batch(8).numpy()
    x = np.ascontiguousarray(np.resize(check, (batch, 3, 112, 112)))
    reference = runners["TorchScript fp32"](check)
    quality = {}
    for label, run in runners.items():
        for _ in range(2):
            run(x)
        quality[label] = parity(reference, run(check))
    rates: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / rounds:
                run(x)
                calls += 1
            rates[label].append(calls * batch / (time.perf_counter() - started))
    return [(label, statistics.median(rates[label]), *quality[label]) for label in runners]


def start_server(repo: Path, name: str, port: int, batch: int, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "ADAFACE_LOG_LEVEL": "WARNING", "ADAFACE_METRICS_PORT": "-1"}
    env["ADAFACE_GALLERY_PATH"] = str(repo / f"galleries-{port}.sqlite3")
    env["ADAFACE_MTCNN_WEIGHTS"] = str(Path(__file__).resolve().parents[1] / ".cache" / "mtcnn")
    return subprocess.Popen(
        [sys.executable, "-m", "adaface_server", "--host", "127.0.0.1", "--port", str(port),
         "--model-repository", str(repo), "--model", name, "--max-batch-size", str(batch),
         "--max-queue", "4096", *flags],
        env=env,
    )  # fmt: skip


class Served(NamedTuple):
    """img/s of one server: aligned crops, and raw photos with detection when measured."""

    crops: float
    photos: float | None = None


def served(
    repo: Path, name: str, batch: int, seconds: float, *flags: str, photos: bool = False
) -> Served:
    """img/s of aligned crops; with `photos`, also of raw photos with detection."""
    port = free_port()
    server = start_server(repo, name, port, batch, *flags)
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, timeout=600, process=server)
        crops = asyncio.run(drive(address, 4, 8, seconds, jpeg_crops(64))).images_per_s
        if photos:
            detect = common_pb2.ALIGNMENT_DETECT
            found = asyncio.run(drive(address, 4, 8, seconds, face_photos(16), detect, "photos"))
    finally:
        server.terminate()
        server.wait(60)
    return Served(crops, found.images_per_s if photos else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ir_50")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the torch.compile bf16 peer row (compiling takes a minute or two)",
    )
    parser.add_argument(
        "--photos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the raw-photos-with-detection rows",
    )
    parser.add_argument(
        "--workers", action=argparse.BooleanOptionalAction, default=True, help="the workers rows"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    cores = len(os.sched_getaffinity(0))
    batch = args.batch_size
    print(f"{args.arch}, batch {batch}, {cores} cores, native bf16: {cpu_supports_bf16()}")
    with tempfile.TemporaryDirectory(prefix="bench_hardware_") as tmp:
        repo = Path(tmp)
        names = {p: f"bench_{p}" for p in ("fp32", "bf16")}
        for precision, name in names.items():
            export_model(None, args.arch, repo, name, max_batch_size=batch, precision=precision,
                         openvino=precision == "fp32")  # fmt: skip
        torch.set_num_threads(cores)
        peers: dict[str, Runner] = {}
        compiled = compiled_bf16(args.arch) if args.compile else None
        if compiled is not None:
            peers["torch.compile (inductor, frozen) under autocast bf16 (peer, not served)"] = (
                compiled
            )
        onnx = onnxruntime_fp32(args.arch, cores)
        if onnx is not None:
            peers["ONNX Runtime fp32 (CPU provider; peer, not served)"] = onnx
        peers.update(openvino_runners(repo, names["fp32"], cores))
        raw = raw_rows(repo, names, batch, cores, args.seconds, args.rounds, peers)
        fp32_raw = raw[0][1]
        print("\n## Raw runtimes (img/s, median of interleaved rounds)\n")
        print("| runtime | img/s | / fp32 | min cosine vs fp32 | max rel norm error |")
        print("|---|---:|---:|---:|---:|")
        for label, rate, cos, rel in raw:
            print(f"| {label} | {rate:.1f} | {rate / fp32_raw:.2f} | {cos:.6f} | {rel:.1e} |")

        threads = str(cores)
        photos = args.photos
        ts = ("--runtime", "torchscript", "--threads", threads, "--detect-runtime", "torch")
        fp32 = served(repo, names["fp32"], batch, args.seconds, *ts, "--precision", "fp32",
                      photos=photos)  # fmt: skip
        bf16 = served(repo, names["fp32"], batch, args.seconds, *ts, "--precision", "bf16",
                      photos=photos)  # fmt: skip
        rows = [
            ("--runtime torchscript --precision fp32 --detect-runtime torch", fp32),
            ("--runtime torchscript --precision bf16 --detect-runtime torch", bf16),
        ]
        if any(label.startswith("OpenVINO bf16") for label, *_ in raw):
            ov = served(repo, names["fp32"], batch, args.seconds, "--runtime", "openvino",
                        "--threads", threads, "--precision", "bf16", "--detect-runtime",
                        "openvino", photos=photos)  # fmt: skip
            rows.append(("--runtime openvino --precision bf16 --detect-runtime openvino", ov))
        # every bf16 row, peers included
        best_bf16_raw = max(rate for label, rate, *_ in raw if "fp32" not in label)
        served_fp32 = fp32.crops
        print("\n## Served (4 clients x 8 aligned 112x112 JPEG crops per call)\n")
        print("| server | img/s | / served fp32 | / fastest raw bf16 |")
        print("|---|---:|---:|---:|")
        for label, result in rows:
            rate = result.crops
            print(f"| {label} | {rate:.1f} | {rate / served_fp32:.2f} | "
                  f"{rate / best_bf16_raw:.2f} |")  # fmt: skip

        if photos:
            print("\n## Raw 640x480 photos with detection vs aligned crops (4 clients x 8 per "
                  "call)\n")  # fmt: skip
            print("| server | crops img/s | photos img/s | photos / crops |")
            print("|---|---:|---:|---:|")
            for label, (crops, found) in rows:
                print(f"| {label} | {crops:.1f} | {found:.1f} | {found / crops:.2f} |")
        if not args.workers:
            return 0

        one = served(repo, names["fp32"], batch, args.seconds, "--workers", "1",
                     "--threads", threads, photos=photos)  # fmt: skip
        two = served(repo, names["fp32"], batch, args.seconds, "--workers", "2", photos=photos)
        print("\n## Workers (runtime and precision auto; 4 clients x 8 per call)\n")
        columns = ["workers", "intra-op threads each", "crops img/s", "/ 1 worker"]
        if photos:
            columns += ["photos img/s", "/ 1 worker"]
        print("| " + " | ".join(columns) + " |")
        print("|---" + "|---:" * (len(columns) - 1) + "|")
        for n, result in ((1, one), (2, two)):
            cells = [str(n), str(max(1, cores // n))]
            cells += [f"{result.crops:.1f}", f"{result.crops / one.crops:.2f}"]
            if photos:
                cells += [f"{result.photos:.1f}", f"{result.photos / one.photos:.2f}"]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
