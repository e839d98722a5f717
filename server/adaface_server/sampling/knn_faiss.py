"""Cosine kNN over identity prototypes with faiss: exact flat search or an approximate IVF index.

faiss is optional (``pip install faiss-cpu``); `available()` says whether it imports. Both
searches run in query chunks, so memory stays N*D (the prototypes, plus the IVF index's own
copy) + N*k*12 for the results. Results match `knn.knn`: (indices int64 [N,k], similarities
float32 [N,k]), most similar first, never the row itself, ties lowest index first.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import numpy as np

from .knn import Stopped, _tidy, unit_rows

METHODS = ("flat", "ivf")
QUERY_CHUNK = 8192


def available() -> bool:
    """Whether faiss is installed. Found without importing it: its loader logs a line per
    CPU variant it tries, which would land in every server's start-up output."""
    return importlib.util.find_spec("faiss") is not None


TRAIN_PER_LIST = 40  # k-means sample rows per list (faiss wants at least 39)


def ivf_lists(n: int) -> int:
    """The IVF list count used for N prototypes: about 4 sqrt(N) (measured faster, at higher
    recall, than sqrt(N) at 50k identities), at most N / TRAIN_PER_LIST, at least 1."""
    return max(1, min(4 * round(math.sqrt(n)), n // TRAIN_PER_LIST))


def knn_faiss(
    x: np.ndarray,
    k: int,
    *,
    method: str = "flat",
    nprobe: int = 16,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most cosine-similar other rows of every row of `x` [N,D], with faiss.

    `method="flat"`: exact (IndexFlatIP, float32). `method="ivf"`: approximate, an
    IndexIVFFlat with ivf_lists(N) lists trained by k-means on a seeded sample of 40 rows
    per list (10 iterations), searching `nprobe` lists per query; its recall against the
    exact result is what `bench/bench_sampling.py` measures. Rows for which the approximate
    search found fewer than k others are completed by an exact search.

    `should_stop` is asked before each chunk of queries; when it says so, Stopped is raised.
    """
    import faiss

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [N, D], got shape {x.shape}")
    n, dim = x.shape
    if not 0 <= k < max(n, 1):
        raise ValueError(f"k must be in 0..N-1 = {n - 1}, got {k}")
    if k == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    unit = np.ascontiguousarray(unit_rows(x))
    if method == "flat" or n <= 4 * (k + 1):
        index = faiss.IndexFlatIP(dim)
    else:
        lists = ivf_lists(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = unit[np.sort(rng.choice(n, min(n, TRAIN_PER_LIST * lists), replace=False))]
        index.cp.niter = 10
        index.cp.seed = seed
        index.train(sample)
        index.nprobe = min(nprobe, lists)
    index.add(unit)
    sims = np.empty((n, k + 1), np.float32)
    found = np.empty((n, k + 1), np.int64)
    for start in range(0, n, QUERY_CHUNK):
        if should_stop is not None and should_stop():
            raise Stopped(f"kNN stopped at query row {start} of {n}")
        stop = min(start + QUERY_CHUNK, n)
        sims[start:stop], found[start:stop] = index.search(unit[start:stop], k + 1)
    # Drop each row itself (normally first; not always among exact duplicates).
    own = found == np.arange(n)[:, None]
    sims[own | (found < 0)] = -np.inf
    found, sims = _tidy(sims, found)
    sims, found = sims[:, :k], found[:, :k]
    short = np.flatnonzero(~np.isfinite(sims).all(axis=1))
    if short.size:
        found[short], sims[short] = _exact_rows(unit, short, k)
    return found, sims


def _exact_rows(unit: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    found = np.empty((rows.size, k), np.int64)
    best = np.empty((rows.size, k), np.float32)
    for start in range(0, rows.size, 1024):
        part = rows[start : start + 1024]
        sims = unit[part] @ unit.T
        sims[np.arange(part.size), part] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        found[start : start + part.size] = order
        best[start : start + part.size] = np.take_along_axis(sims, order, 1)
    return found, best
