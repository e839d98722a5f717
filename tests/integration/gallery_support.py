"""Helpers shared by the gallery integration tests: inputs, stubs and error checks."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from adaface.v1 import common_pb2, gallery_pb2

DIM = 512
REPO = Path(__file__).resolve().parents[2]


def crop(seed: int) -> np.ndarray:
    """A deterministic 112x112 RGB 'aligned face crop' with structure and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:112, 0:112]
    base = np.stack([(xx * 3 + seed * 11) % 256, (yy * 2 + seed) % 256, (xx + yy) % 256], -1)
    noise = rng.integers(-30, 30, (112, 112, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def unit_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def image_sample(seed: int) -> gallery_pb2.GallerySample:
    return gallery_pb2.GallerySample(image=common_pb2.ImageInput(encoded=png(crop(seed))))


def corrupt_sample() -> gallery_pb2.GallerySample:
    return gallery_pb2.GallerySample(image=common_pb2.ImageInput(encoded=b"not an image at all"))


def vector_sample(vector: np.ndarray) -> gallery_pb2.GallerySample:
    v = np.asarray(vector, "<f4")
    return gallery_pb2.GallerySample(vector=common_pb2.Embedding(vector=v.tobytes(), dim=v.size))


def rpc_error(call, request, timeout: float = 60) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=timeout)
    return err.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server_process(
    repository: Path,
    model: str,
    gallery_path: Path | None,
    port: int,
    log: Path,
    store_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """`python -m adaface_server` as a real child process (killable with SIGKILL).

    `store_args` replaces `--gallery-path` (e.g. `--gallery-url ...`); `env` adds variables."""
    store = store_args if store_args is not None else ["--gallery-path", str(gallery_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "adaface_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model-repository",
                str(repository),
                "--model",
                model,
                "--threads",
                "1",
                *store,
                "--metrics-port",
                "0",
                "--precision",
                "fp32",  # gallery tests compare with fp32 vectors (server_settings does too)
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_serving(address: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {address} not SERVING:\n{log.read_text()}")
