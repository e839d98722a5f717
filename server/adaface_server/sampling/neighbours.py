"""Which kNN BuildEpoch runs (tiles on CPU or GPU, faiss flat or IVF), picked from the settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Settings
from . import knn_faiss
from .knn import knn

# On a GPU, fewer and larger tiles: 16384^2 float32 is 1 GiB, and per-tile launch overhead
# would dominate with CPU-sized tiles at a million identities.
GPU_MIN_BLOCK = 16384


@dataclass(frozen=True)
class KnnMethod:
    """The resolved method: `method` tiles / faiss-flat / faiss-ivf, `device` for tiles, and
    `label` as reported in EpochHeader.knn_precision (fp32 and bf16 tiles, faiss flat =
    fp32: exact; ivf: approximate)."""

    method: str
    device: str
    label: str


def resolve(settings: Settings) -> KnnMethod:
    """Resolves "auto" choices; raises ValueError when faiss is asked for but missing."""
    device = settings.sampling_knn_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    method = settings.sampling_knn_method
    if method == "auto":
        exact_faiss = device == "cpu" and settings.sampling_knn_precision == "fp32"
        method = "faiss-flat" if exact_faiss and knn_faiss.available() else "tiles"
    if method.startswith("faiss") and not knn_faiss.available():
        raise ValueError(
            f"--sampling-knn-method {method} needs faiss: pip install faiss-cpu "
            "(or adaface-serving[knn])"
        )
    label = {
        "tiles": settings.sampling_knn_precision,
        "faiss-flat": "fp32",
        "faiss-ivf": "ivf",
    }[method]
    return KnnMethod(method, device, label)


def neighbours(
    x: np.ndarray,
    k: int,
    chosen: KnnMethod,
    settings: Settings,
    should_stop: Callable[[], bool] | None = None,
) -> np.ndarray:
    """[N, k] int64: each prototype's k nearest others (cosine), nearest first. `should_stop`
    is asked between tiles (or query chunks); when it says so, knn.Stopped is raised."""
    if chosen.method == "faiss-flat":
        return knn_faiss.knn_faiss(x, k, method="flat", should_stop=should_stop)[0]
    if chosen.method == "faiss-ivf":
        return knn_faiss.knn_faiss(
            x, k, method="ivf", nprobe=settings.sampling_knn_nprobe, should_stop=should_stop
        )[0]
    block = settings.sampling_knn_block
    if chosen.device != "cpu":
        block = max(block, GPU_MIN_BLOCK)
    return knn(
        x,
        k,
        block=block,
        precision=settings.sampling_knn_precision,
        device=chosen.device,
        should_stop=should_stop,
    )[0]
