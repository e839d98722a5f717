"""Exact gallery search with the matrix on a torch device (`--gallery-device cuda`).

The host Rows stay the source of truth (the store's mirror, templates, compaction, the
exact rescoring); a DeviceMirror keeps an fp16 copy of them on the device, in step with
every snapshot the index publishes:

- appends copy only the new rows (host rows below a buffer's `used` are never rewritten,
  so the device rows below the mirrored count never change either);
- a host buffer that grew carries its rows over: the device copy grows on the device;
- a compacted or otherwise new buffer is copied whole;
- tombstones travel as the snapshot's sorted row numbers, uploaded when they change.

Each DeviceRows is immutable from a reader's point of view (rows it covers are never
written again), so a search that holds a snapshot needs no lock, as on the host.

A search moves its probes to the device once, scores each chunk with one fp16 matrix
product, keeps the best `k + margin` rows per probe with torch.topk (no host round trip
between chunks) and copies those candidates back. They are rescored in fp32 against the
host matrix, exactly as the host path does, so results are the exact fp32 top-k of the
stored vectors, ordered by (score descending, row ascending). The device holds fp16 only
(2 bytes a value: 10 GB for 10M x 512); an fp32 copy for rescoring would double that for
the sake of a few dozen rows per probe.

Exactness: for unit vectors the fp16 score of a row is within FP16_ERROR of its fp32 score,
so every row of the exact top-k scores at least (k-th best fp16 score) - 2 * FP16_ERROR in
fp16. The candidates are known to hold every such row when the best row left out of them
scores below that threshold; otherwise (many rows crowded near the k-th score) those
probes are scanned again keeping every row above the threshold, as the host's bf16 pass
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .index import Rows, StopCheck

# |fp16 score - fp32 score| for unit vectors: inputs rounded to fp16 (2 * 2^-11 by
# Cauchy-Schwarz), fp32 accumulation (~d * 2^-24), the fp16 output (2^-11): about 0.0015.
# cuBLAS may add a few fp16-rounded split-K partial sums (2^-11 each, |partial| <= 1);
# 0.004 covers five of them.
FP16_ERROR = 0.004
# Rows kept per probe and chunk beyond the k wanted: enough that the threshold test above
# almost always passes, few enough that topk and the copy back stay small.
_EXTRA = 32
_UPLOAD_ROWS = 65536  # host rows converted and copied per step


class GalleryDeviceError(ValueError):
    """--gallery-device names no usable device."""


def resolve_device(setting: str) -> torch.device:
    """torch.device for a --gallery-device other than cpu: cuda or cuda:N, present here."""
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise GalleryDeviceError(
            f"--gallery-device must be cpu, cuda or cuda:N, got {setting!r}"
        ) from None
    if device.type != "cuda":
        raise GalleryDeviceError(f"--gallery-device must be cpu, cuda or cuda:N, got {setting!r}")
    if not torch.cuda.is_available():
        raise GalleryDeviceError(
            f"--gallery-device {setting}: no CUDA device is available "
            "(torch.cuda.is_available() is false); use --gallery-device cpu"
        )
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise GalleryDeviceError(
            f"--gallery-device {setting}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class DeviceRows:
    """Rows [0, n) of one host buffer lineage on the device, with one Rows' tombstones."""

    lineage: object  # the host buffer lineage mirrored (see index._Buffer)
    matrix: torch.Tensor  # [capacity, dim] fp16; rows >= n may be written later
    n: int
    dead_host: np.ndarray  # the Rows.dead this was synced with (identity checked)
    dead: torch.Tensor  # the same row numbers on the device

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * 2 + self.dead.numel() * 8


class DeviceMirror:
    """Keeps one sequence of Rows (an index's samples, or its templates) on a device.

    Only the index's writer calls `sync`, under the index's lock; readers use the
    DeviceRows it returned, published inside a snapshot.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._state: DeviceRows | None = None
        if self.device.type == "cuda":
            # FP16_ERROR assumes fp32 accumulation: no fp16-rounded split-K partial sums.
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    def sync(self, rows: Rows) -> DeviceRows:
        state = self._state
        if state is not None and state.lineage is rows.buffer.lineage and state.n <= rows.n:
            if state.n == rows.n and state.dead_host is rows.dead:
                return state
            matrix, start = state.matrix, state.n
            if rows.n > matrix.shape[0]:
                grown = torch.empty(
                    (rows.buffer.capacity, rows.dim), dtype=torch.float16, device=self.device
                )
                grown[:start] = matrix[:start]
                matrix = grown
            dead = state.dead if state.dead_host is rows.dead else self._upload_dead(rows)
        else:
            # A first copy, or a compacted (or forked) buffer: the rows are not the same.
            self._state = None  # let the old copy go before the new one is allocated
            state = None
            matrix = torch.empty(
                (rows.buffer.capacity, rows.dim), dtype=torch.float16, device=self.device
            )
            start = 0
            dead = self._upload_dead(rows)
        host = rows.matrix
        for s in range(start, rows.n, _UPLOAD_ROWS):
            block = host[s : min(s + _UPLOAD_ROWS, rows.n)]
            matrix[s : s + len(block)] = torch.from_numpy(block).to(torch.float16)
        self._state = DeviceRows(rows.buffer.lineage, matrix, rows.n, rows.dead, dead)
        return self._state

    def _upload_dead(self, rows: Rows) -> torch.Tensor:
        return torch.from_numpy(rows.dead).to(self.device)


def host_view(rows: Rows) -> DeviceRows:
    """The fp16 rows of a host Rows as a DeviceRows on the CPU (no copy): top_rows on it is
    the exact search of an fp16 gallery kept in host memory (--gallery-dtype float16)."""
    if rows.matrix.dtype != np.float16:
        raise ValueError(f"host_view needs float16 rows, not {rows.matrix.dtype}")
    dead = torch.from_numpy(np.array(rows.dead, dtype=np.int64))  # a writable copy
    return DeviceRows(rows.buffer.lineage, torch.from_numpy(rows.matrix), rows.n, rows.dead, dead)


def _stop(should_stop: StopCheck, row: int, rows: int) -> None:
    from .index import _check

    _check(should_stop, row, rows)


def top_rows(
    dev: DeviceRows,
    rows: Rows,
    probes: np.ndarray,
    k: int,
    chunk_bytes: int,
    should_stop: StopCheck = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact k best live rows per probe, as index.top_rows: (scores [q,k], rows [q,k]),
    best first, ties by row number. `dev` must be the mirror of `rows` (same snapshot).

    `should_stop` is asked before each chunk is queued; when it says so, Stopped is raised.
    """
    q = probes.shape[0]
    k = max(0, min(k, rows.alive))
    if k == 0 or rows.n == 0:
        return np.empty((q, 0), np.float32), np.empty((q, 0), np.int64)
    assert dev.n == rows.n and dev.dead_host is rows.dead, "device rows of another snapshot"
    device = dev.matrix.device
    probes_d = torch.from_numpy(probes).to(device=device, dtype=torch.float16)
    keep = k + max(k, _EXTRA)
    chunk = max(keep, 4096, chunk_bytes // (2 * q))
    best_s = torch.empty((q, 0), dtype=torch.float16, device=device)
    best_r = torch.empty((q, 0), dtype=torch.int64, device=device)
    # An upper bound on the fp16 score of every live row not among the candidates.
    floor = torch.full((q,), -torch.inf, device=device)
    for start in range(0, rows.n, chunk):
        _stop(should_stop, start, rows.n)
        stop = min(start + chunk, rows.n)
        scores = _chunk_scores(dev, rows, probes_d, start, stop)
        take = min(keep, stop - start)
        part_s, part = torch.topk(scores, take, dim=1, sorted=False)
        if take < stop - start:
            floor = torch.maximum(floor, part_s.min(dim=1).values.float())
        best_s = torch.cat([best_s, part_s], dim=1)
        best_r = torch.cat([best_r, part + start], dim=1)
        if best_s.shape[1] > keep:
            best_s, pick = torch.topk(best_s, keep, dim=1, sorted=False)
            best_r = torch.gather(best_r, 1, pick)
            floor = torch.maximum(floor, best_s.min(dim=1).values.float())
    best_f = best_s.float()
    kth = torch.topk(best_f, k, dim=1).values[:, -1]
    # Clamped so tombstoned rows (-inf) never qualify.
    threshold = (kth - 2 * FP16_ERROR).clamp(min=-3.0)
    covered = floor < threshold
    # The only copies back: a few candidates per probe and their thresholds.
    cand_s, cand_r = best_f.cpu().numpy(), best_r.cpu().numpy()
    threshold_h, covered_h = threshold.cpu().numpy(), covered.cpu().numpy()
    ok = cand_s >= threshold_h[:, None]
    ok[~covered_h] = False
    p_idx, col = np.nonzero(ok)
    r_idx = cand_r[p_idx, col]
    crowded = np.flatnonzero(~covered_h)
    if len(crowded):
        p_more, r_more = _scan_above(
            dev, rows, probes_d[torch.from_numpy(crowded).to(device)],
            threshold[torch.from_numpy(crowded).to(device)], chunk_bytes, should_stop,
        )  # fmt: skip
        p_idx = np.concatenate([p_idx, crowded[p_more]])
        r_idx = np.concatenate([r_idx, r_more])
    return _rescored(rows, probes, k, p_idx, r_idx)


def _chunk_scores(
    dev: DeviceRows, rows: Rows, probes_d: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    scores = probes_d @ dev.matrix[start:stop].T
    lo, hi = np.searchsorted(rows.dead, [start, stop])
    if hi > lo:
        scores[:, dev.dead[lo:hi] - start] = -torch.inf
    return scores


def _scan_above(
    dev: DeviceRows,
    rows: Rows,
    probes_d: torch.Tensor,
    threshold: torch.Tensor,
    chunk_bytes: int,
    should_stop: StopCheck,
) -> tuple[np.ndarray, np.ndarray]:
    """(probe, row) of every live row scoring >= its probe's threshold in fp16."""
    q = probes_d.shape[0]
    chunk = max(4096, chunk_bytes // (2 * q))
    found_p, found_r = [], []
    for start in range(0, rows.n, chunk):
        _stop(should_stop, start, rows.n)
        stop = min(start + chunk, rows.n)
        scores = _chunk_scores(dev, rows, probes_d, start, stop)
        p_idx, r_idx = torch.nonzero(scores.float() >= threshold[:, None], as_tuple=True)
        found_p.append(p_idx.cpu().numpy())
        found_r.append(r_idx.cpu().numpy() + start)
    return np.concatenate(found_p), np.concatenate(found_r)


def _rescored(
    rows: Rows, probes: np.ndarray, k: int, p_idx: np.ndarray, r_idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates per probe by fp32 score on the host rows, ties by row."""
    q = probes.shape[0]
    matrix = rows.matrix
    exact = np.einsum("nd,nd->n", matrix[r_idx].astype(np.float32, copy=False), probes[p_idx])
    order = np.lexsort((r_idx, -exact, p_idx))
    p_idx, r_idx, exact = p_idx[order], r_idx[order], exact[order]
    starts = np.searchsorted(p_idx, np.arange(q))
    take = starts[:, None] + np.arange(k)[None, :]
    return exact[take].astype(np.float32), r_idx[take].astype(np.int64)
