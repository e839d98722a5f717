"""In-memory gallery search: an exact index (matrix product + top-k) and an optional HNSW one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import FailedPrecondition
from . import device_search
from .device_search import DeviceMirror, DeviceRows

log = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "float16": np.float16}
_MIN_CAPACITY = 1024
# Candidate rows per wanted identity on the first pass of max-scoring: identities with
# several samples near the probe would otherwise need a second pass.
_OVERFETCH = 4


class _Buffer:
    """Append-only storage shared by successive Rows; rows below `used` are never rewritten."""

    def __init__(
        self, dim: int, dtype: np.dtype, capacity: int, lineage: object | None = None
    ) -> None:
        self.matrix = np.empty((capacity, dim), dtype=dtype)
        self.labels = np.empty(capacity, dtype=np.int64)
        self.keys = np.empty(capacity, dtype=np.int64)
        self.used = 0
        # Shared by a buffer and the bigger copies it grows into (same rows below `used`);
        # a device mirror keeps its rows while the lineage stays the same.
        self.lineage = object() if lineage is None else lineage

    @property
    def capacity(self) -> int:
        return self.matrix.shape[0]


@dataclass(frozen=True)
class Rows:
    """An immutable view of rows [0, n) of a buffer, minus the tombstoned rows in `dead`.

    Searches read a Rows while the writer derives the next one: appends go to rows >= n
    (invisible here), removals make a new `dead` array, so no reader sees a partial write.
    """

    buffer: _Buffer
    n: int
    dead: np.ndarray  # sorted int64 row numbers removed since the last compaction

    @classmethod
    def empty(cls, dim: int, dtype: np.dtype, capacity: int = _MIN_CAPACITY) -> Rows:
        return cls(_Buffer(dim, dtype, max(capacity, 1)), 0, np.empty(0, np.int64))

    @property
    def dim(self) -> int:
        return self.buffer.matrix.shape[1]

    @property
    def alive(self) -> int:
        return self.n - len(self.dead)

    @property
    def matrix(self) -> np.ndarray:
        return self.buffer.matrix[: self.n]

    @property
    def labels(self) -> np.ndarray:
        return self.buffer.labels[: self.n]

    @property
    def keys(self) -> np.ndarray:
        return self.buffer.keys[: self.n]

    @property
    def nbytes(self) -> int:
        b = self.buffer
        return b.matrix.nbytes + b.labels.nbytes + b.keys.nbytes + self.dead.nbytes

    def alive_mask(self) -> np.ndarray:
        mask = np.ones(self.n, dtype=bool)
        mask[self.dead] = False
        return mask

    def appended(self, keys: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> Rows:
        m = len(keys)
        if m == 0:
            return self
        buf = self.buffer
        need = self.n + m
        # Writing in place is safe only at the buffer's tip: no other Rows can see those rows.
        if buf.used != self.n or need > buf.capacity:
            # A copy from below the tip drops rows some other Rows saw: a new lineage then.
            lineage = buf.lineage if buf.used == self.n else None
            grown = _Buffer(self.dim, buf.matrix.dtype, max(need, int(buf.capacity * 1.5)), lineage)
            grown.matrix[: self.n] = buf.matrix[: self.n]
            grown.labels[: self.n] = buf.labels[: self.n]
            grown.keys[: self.n] = buf.keys[: self.n]
            grown.used = self.n
            buf = grown
        buf.matrix[self.n : need] = vectors
        buf.labels[self.n : need] = labels
        buf.keys[self.n : need] = keys
        buf.used = need
        return Rows(buf, need, self.dead)

    def without(self, rows: np.ndarray) -> Rows:
        if len(rows) == 0:
            return self
        return Rows(self.buffer, self.n, np.union1d(self.dead, rows.astype(np.int64)))

    def compacted(self) -> Rows:
        keep = np.flatnonzero(self.alive_mask())
        out = Rows.empty(self.dim, self.buffer.matrix.dtype, len(keep) + _MIN_CAPACITY)
        buf = out.buffer
        # Row by block so a big gallery never needs a second full temporary copy.
        step = 65536
        for s in range(0, len(keep), step):
            part = keep[s : s + step]
            buf.matrix[s : s + len(part)] = self.buffer.matrix[part]
        buf.labels[: len(keep)] = self.buffer.labels[keep]
        buf.keys[: len(keep)] = self.buffer.keys[keep]
        buf.used = len(keep)
        return Rows(buf, len(keep), out.dead)

    def rows_of_keys(self, keys: np.ndarray) -> np.ndarray:
        """Row numbers of the given keys (keys increase with row number); unknown ones skipped."""
        stored = self.keys
        pos = np.searchsorted(stored, keys)
        ok = pos < len(stored)
        pos = pos[ok]
        return pos[stored[pos] == keys[ok]]


#: Asked between chunks of a long search (stopping.py): True once its caller has gone.
StopCheck = Callable[[], bool] | None


class Stopped(Exception):
    """A long computation (a search, an import) was told to stop: its caller left."""


def _check(should_stop: StopCheck, row: int, rows: int) -> None:
    if should_stop is not None and should_stop():
        raise Stopped(f"search stopped at row {row} of {rows}")


def top_rows(
    rows: Rows, probes: np.ndarray, k: int, chunk_bytes: int, should_stop: StopCheck = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k best live rows per probe by inner product: (scores [q,k], rows [q,k]), best first.

    `should_stop` is asked before each chunk; when it says so, Stopped is raised.

    The gallery is scanned in chunks sized so one block of scores stays within
    `chunk_bytes`; one probe makes a single sgemv over everything. fp32 products run in
    numpy's BLAS. Top-k uses torch.topk: about 3x faster than np.argpartition on wide score
    blocks. fp16 rows (--gallery-dtype float16) go through the device search's algorithm on
    the CPU (device_search.host_view): torch multiplies half floats directly (numpy would
    convert each chunk first, at ~10x the cost), and candidates within its error margin are
    rescored in fp32, so the result is the exact fp32 top-k of the stored fp16 vectors.
    """
    q = probes.shape[0]
    k = max(0, min(k, rows.alive))
    if k == 0 or rows.n == 0:
        return np.empty((q, 0), np.float32), np.empty((q, 0), np.int64)
    matrix = rows.matrix
    if matrix.dtype == np.float16:
        view = device_search.host_view(rows)
        return device_search.top_rows(view, rows, probes, k, chunk_bytes, should_stop)
    if q >= BF16_MIN_PROBES:
        return _top_rows_bf16(rows, probes, k, chunk_bytes, should_stop)
    chunk = max(k, 4096, chunk_bytes // (4 * q))
    best_s = torch.empty((q, 0), dtype=torch.float32)
    best_r = torch.empty((q, 0), dtype=torch.int64)
    dead = rows.dead
    for start in range(0, rows.n, chunk):
        _check(should_stop, start, rows.n)
        stop = min(start + chunk, rows.n)
        scores = torch.from_numpy(probes @ matrix[start:stop].T)
        lo, hi = np.searchsorted(dead, [start, stop])
        if hi > lo:
            scores[:, torch.from_numpy(dead[lo:hi] - start)] = -torch.inf
        part_s, part = _top_lowest_rows(scores, min(k, stop - start))
        best_s = torch.cat([best_s, part_s], dim=1)
        best_r = torch.cat([best_r, part + start], dim=1)
        if best_s.shape[1] > k:
            # Best k by (score descending, row ascending): a stable sort by score of the
            # candidates in row order.
            by_row = torch.argsort(best_r, dim=1)
            best_s, best_r = torch.gather(best_s, 1, by_row), torch.gather(best_r, 1, by_row)
            order = torch.sort(best_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s, best_r = torch.gather(best_s, 1, order), torch.gather(best_r, 1, order)
    scores_np, rows_np = best_s.numpy(), best_r.numpy()
    # Best first; equal scores by row number (as the bf16 and device passes order them).
    order = np.lexsort((rows_np, -scores_np), axis=1)
    return np.take_along_axis(scores_np, order, axis=1), np.take_along_axis(rows_np, order, axis=1)


def _top_lowest_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk of each row of `scores`, except that of equal scores at the k-th place
    the lowest columns win (topk picks any): results do not depend on the implementation.

    The check is one pass over the scores, which are dim times smaller than the rows
    they come from; the per-probe fix runs only where such a tie exists."""
    top_s, top = torch.topk(scores, k, dim=1, sorted=False)
    if k == scores.shape[1]:
        return top_s, top
    kth = top_s.min(dim=1, keepdim=True).values
    outside = (scores == kth).sum(dim=1) > (top_s == kth).sum(dim=1)
    for p in torch.nonzero(outside).flatten().tolist():
        above = torch.nonzero(scores[p] > kth[p]).flatten()
        tied = torch.nonzero(scores[p] == kth[p]).flatten()[: k - len(above)]
        top[p] = torch.cat([above, tied])
        top_s[p] = scores[p, top[p]]
    return top_s, top


# Many probes: a bf16 pass (about 3x the fp32 GEMM rate here) picks candidates, which are
# rescored in fp32. Bound on |bf16 score - fp32 score| for unit vectors: inputs rounded to
# 8-bit mantissas (2 * 2^-9, Cauchy-Schwarz), fp32 accumulation (~d * 2^-24) and the bf16
# output (2^-9): about 0.006; 0.008 leaves margin. A row of the true top-k then always
# scores >= (final k-th bf16 score) - 2 * 0.008 in bf16, so keeping every such row and
# rescoring it returns exactly the fp32 top-k.
BF16_MIN_PROBES = 64
BF16_ERROR = 0.008


def _top_rows_bf16(
    rows: Rows, probes: np.ndarray, k: int, chunk_bytes: int, should_stop: StopCheck = None
) -> tuple[np.ndarray, np.ndarray]:
    q, dim = probes.shape
    matrix = rows.matrix
    probes_b = torch.from_numpy(probes).bfloat16()
    chunk = max(k, 4096, chunk_bytes // (2 * (q + dim)))
    kth = torch.full((q,), -torch.inf)
    cand_p, cand_r, cand_s = [], [], []
    dead = rows.dead
    for start in range(0, rows.n, chunk):
        _check(should_stop, start, rows.n)
        stop = min(start + chunk, rows.n)
        block = torch.from_numpy(matrix[start:stop]).bfloat16()
        scores = (probes_b @ block.T).float()
        lo, hi = np.searchsorted(dead, [start, stop])
        if hi > lo:
            scores[:, torch.from_numpy(dead[lo:hi] - start)] = -torch.inf
        top, _ = torch.topk(scores, min(k, stop - start), dim=1, sorted=False)
        if top.shape[1] == k:
            kth = torch.maximum(kth, top.min(dim=1).values)
        # Clamped so tombstoned rows (-inf) never qualify while kth is still -inf.
        keep = scores >= (kth - 2 * BF16_ERROR).clamp(min=-3.0)[:, None]
        p_idx, r_idx = torch.nonzero(keep, as_tuple=True)
        cand_p.append(p_idx)
        cand_r.append(r_idx + start)
        cand_s.append(scores[p_idx, r_idx])
    p_idx, r_idx, s = torch.cat(cand_p), torch.cat(cand_r), torch.cat(cand_s)
    final = s >= (kth - 2 * BF16_ERROR).clamp(min=-3.0)[p_idx]
    p_np, r_np = p_idx[final].numpy(), r_idx[final].numpy()
    exact = np.einsum("nd,nd->n", matrix[r_np], probes[p_np])
    order = np.lexsort((-exact, p_np))
    p_np, r_np, exact = p_np[order], r_np[order], exact[order]
    starts = np.searchsorted(p_np, np.arange(q))
    take = starts[:, None] + np.arange(k)[None, :]
    return exact[take].astype(np.float32), r_np[take].astype(np.int64)


@dataclass(frozen=True)
class Hit:
    """One identity found for a probe."""

    label: int  # the identity's row id in SQLite
    identity: str
    score: float
    sample_id: int


@dataclass(frozen=True)
class Change:
    """One committed write, applied to the index as a unit (a search sees all of it or none)."""

    add_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    add_labels: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    add_vectors: np.ndarray | None = None  # [m, dim] float32, unit rows
    remove_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    names: Mapping[int, str] = field(default_factory=dict)  # labels of new identities
    # Identities gaining their first live sample minus those losing their last one (the
    # store knows; counting labels here would cost a pass over the whole gallery).
    identity_delta: int = 0


@dataclass(frozen=True)
class Snapshot:
    """What one search reads: samples, optional mean templates, identity names."""

    samples: Rows
    templates: Rows | None  # one unit row per identity (key = label), built on first use
    names: Mapping[int, str]  # label -> identity id; only grows between compactions
    identities: int = 0  # identities with at least one live sample
    # With a search device: the same samples and templates, mirrored there in fp16.
    device_samples: DeviceRows | None = None
    device_templates: DeviceRows | None = None


@dataclass(frozen=True)
class IndexStats:
    rows: int
    alive: int
    nbytes: int


class ExactIndex:
    """Exact cosine search over a gallery's unit vectors, fp32 or fp16 in memory.

    Writers (one at a time, under `_lock`) publish a new Snapshot by a single reference
    assignment; searches take the current Snapshot and never lock.

    `device` (a torch device, e.g. "cuda:0"; "cpu" runs the same code on the CPU) mirrors
    the rows there in fp16 and searches them with device_search; None (the default)
    searches the host rows with numpy and torch on the CPU. Results are the same.
    """

    kind = "exact"

    def __init__(
        self,
        dim: int,
        dtype: str = "float32",
        chunk_bytes: int = 64 << 20,
        compact_ratio: float = 0.25,
        capacity: int = _MIN_CAPACITY,
        device: str | None = None,
    ) -> None:
        self.dim = dim
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.compact_ratio = compact_ratio
        self.device = device
        self._lock = threading.Lock()
        self._template_rows: dict[int, int] = {}  # label -> template row (writer side)
        # (samples, templates) mirrors on the search device, or None for host search.
        self._mirrors = None if device is None else (DeviceMirror(device), DeviceMirror(device))
        self._snapshot = Snapshot(Rows.empty(dim, DTYPES[dtype], capacity), None, {})
        self._publish(self._snapshot)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def stats(self) -> IndexStats:
        snap = self._snapshot
        nbytes = snap.samples.nbytes + (snap.templates.nbytes if snap.templates else 0)
        return IndexStats(snap.samples.n, snap.samples.alive, nbytes + self._extra_bytes())

    def _extra_bytes(self) -> int:
        return 0

    def device_bytes(self) -> int:
        """Memory the search device holds for this index (0 without one)."""
        snap = self._snapshot
        return sum(d.nbytes for d in (snap.device_samples, snap.device_templates) if d)

    def _publish(self, snap: Snapshot) -> Snapshot:
        """Makes `snap` the one searches read, mirrored on the search device first."""
        if self._mirrors is not None:
            samples, templates = self._mirrors
            snap = replace(
                snap,
                device_samples=samples.sync(snap.samples),
                device_templates=None if snap.templates is None else templates.sync(snap.templates),
            )
        self._snapshot = snap
        return snap

    # -- writes ------------------------------------------------------------------------

    def apply(self, changes: list[Change]) -> None:
        """Applies committed changes in order and publishes them as one new snapshot."""
        with self._lock:
            snap = self._snapshot
            samples, templates, names = snap.samples, snap.templates, snap.names
            identities = snap.identities
            for change in changes:
                if change.names:
                    # Readers look up labels of rows they can see, which exist only after
                    # publication: adding names first is invisible to them.
                    names.update(change.names)  # type: ignore[attr-defined]
                removed = samples.rows_of_keys(np.sort(change.remove_keys))
                touched = np.union1d(change.add_labels, samples.buffer.labels[removed])
                if change.add_vectors is not None and len(change.add_keys):
                    self._add_to_ann(samples.n, change.add_vectors)
                    samples = samples.appended(
                        change.add_keys, change.add_labels, self._cast(change.add_vectors)
                    )
                samples = samples.without(removed)
                if templates is not None and len(touched):
                    templates = self._update_templates(samples, templates, touched)
                identities += change.identity_delta
            new = Snapshot(samples, templates, names, identities)
            if samples.dead.size > max(_MIN_CAPACITY, self.compact_ratio * samples.n):
                new = self._compact(new)
            self._publish(new)

    def _cast(self, vectors: np.ndarray) -> np.ndarray:
        return vectors.astype(DTYPES[self.dtype], copy=False)

    def _compact(self, snap: Snapshot) -> Snapshot:
        samples = snap.samples.compacted()
        live = set(np.unique(samples.labels).tolist())
        names = {label: name for label, name in snap.names.items() if label in live}
        templates = None
        if snap.templates is not None:
            templates = snap.templates.compacted()
            self._template_rows = {int(lb): i for i, lb in enumerate(templates.labels)}
        self._rebuild_ann(samples)
        log.info("compacted a gallery index: %d -> %d rows", snap.samples.n, samples.n)
        return Snapshot(samples, templates, names, snap.identities)

    # -- ANN hooks (no-ops for the exact index) -------------------------------------------

    def _add_to_ann(self, first_row: int, vectors: np.ndarray) -> None:
        pass

    def _rebuild_ann(self, samples: Rows) -> None:
        pass

    # -- mean templates ------------------------------------------------------------------

    def _update_templates(self, samples: Rows, templates: Rows, touched: np.ndarray) -> Rows:
        mask = np.isin(samples.labels, touched) & samples.alive_mask()
        rows = np.flatnonzero(mask)
        labels, means = _group_means(samples, rows)
        old = [self._template_rows.pop(int(t)) for t in touched if int(t) in self._template_rows]
        templates = templates.without(np.asarray(old, np.int64))
        first = templates.n
        templates = templates.appended(labels, labels, self._cast(means))
        for i, label in enumerate(labels.tolist()):
            self._template_rows[label] = first + i
        return templates

    def _ensure_templates(self) -> Snapshot:
        snap = self._snapshot
        if snap.templates is not None:
            return snap
        with self._lock:
            snap = self._snapshot
            if snap.templates is None:
                samples = snap.samples
                labels, means = _group_means(samples, np.flatnonzero(samples.alive_mask()))
                templates = Rows.empty(self.dim, DTYPES[self.dtype], len(labels) + _MIN_CAPACITY)
                templates = templates.appended(labels, labels, self._cast(means))
                self._template_rows = {int(lb): i for i, lb in enumerate(labels)}
                snap = Snapshot(samples, templates, snap.names, snap.identities)
                snap = self._publish(snap)
            return snap

    # -- search --------------------------------------------------------------------------

    def search(
        self,
        probes: np.ndarray,
        k: int,
        min_score: float | None,
        scoring: str = "max",
        should_stop: StopCheck = None,
    ) -> tuple[list[list[Hit]], int]:
        """Top-k identities per probe (unit float32 rows) and the identity count searched.
        `should_stop` is asked between chunks (Stopped when it says so)."""
        probes = np.ascontiguousarray(probes, dtype=np.float32)
        if scoring == "mean":
            snap = self._ensure_templates()
            found = self._search_mean(snap, probes, k, min_score, should_stop)
            return found, snap.templates.alive
        snap = self._snapshot
        return self._search_max(snap, probes, k, min_score, should_stop), snap.identities

    def _top_rows(
        self,
        rows: Rows,
        mirror: DeviceRows | None,
        probes: np.ndarray,
        k: int,
        should_stop: StopCheck,
    ) -> tuple[np.ndarray, np.ndarray]:
        if mirror is None:
            return top_rows(rows, probes, k, self.chunk_bytes, should_stop)
        return device_search.top_rows(mirror, rows, probes, k, self.chunk_bytes, should_stop)

    def _candidates(
        self, snap: Snapshot, probes: np.ndarray, want: int, should_stop: StopCheck = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._top_rows(snap.samples, snap.device_samples, probes, want, should_stop)

    def _search_max(
        self,
        snap: Snapshot,
        probes: np.ndarray,
        k: int,
        min_score: float | None,
        should_stop: StopCheck = None,
    ) -> list[list[Hit]]:
        samples = snap.samples
        results: list[list[Hit] | None] = [None] * len(probes)
        pending = np.arange(len(probes))
        want = min(samples.alive, k * _OVERFETCH)
        while len(pending):
            scores, rows = self._candidates(snap, probes[pending], want, should_stop)
            retry = []
            for j, p in enumerate(pending):
                hits, complete = _max_hits(snap, scores[j], rows[j], k, min_score)
                # Enough distinct identities among the best `want` rows proves they are the
                # top k: any identity outside scores at most the worst row inside.
                if complete or want >= samples.alive:
                    results[p] = hits
                else:
                    retry.append(p)
            pending = np.asarray(retry, dtype=np.int64)
            want = min(samples.alive, want * _OVERFETCH)
        return results  # type: ignore[return-value]

    def _search_mean(
        self,
        snap: Snapshot,
        probes: np.ndarray,
        k: int,
        min_score: float | None,
        should_stop: StopCheck = None,
    ) -> list[list[Hit]]:
        templates = snap.templates
        assert templates is not None
        scores, rows = self._top_rows(templates, snap.device_templates, probes, k, should_stop)
        samples = snap.samples
        out = []
        for j in range(len(probes)):
            keep = scores[j] >= (min_score if min_score is not None else -np.inf)
            labels = templates.labels[rows[j][keep]]
            best = _best_samples(samples, probes[j], labels)
            out.append(
                [
                    Hit(int(lb), snap.names[int(lb)], float(s), best[int(lb)])
                    for lb, s in zip(labels, scores[j][keep], strict=True)
                ]
            )
        return out


def _max_hits(
    snap: Snapshot, scores: np.ndarray, rows: np.ndarray, k: int, min_score: float | None
) -> tuple[list[Hit], bool]:
    """Per-identity best rows among one probe's candidates; complete when provably top-k."""
    samples = snap.samples
    finite = np.isfinite(scores)
    if not finite.all():  # ANN candidates may include filtered (-inf) slots
        scores, rows = scores[finite], rows[finite]
    labels = samples.buffer.labels[rows]
    _, first = np.unique(labels, return_index=True)
    first.sort()
    hits = []
    for i in first[:k]:
        score = float(scores[i])
        if min_score is not None and score < min_score:
            break
        label = int(labels[i])
        hits.append(Hit(label, snap.names[label], score, int(samples.buffer.keys[rows[i]])))
    complete = len(first) >= k or (
        min_score is not None and len(scores) > 0 and float(scores[-1]) < min_score
    )
    return hits, complete


def _best_samples(samples: Rows, probe: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    rows = np.flatnonzero(np.isin(samples.labels, labels) & samples.alive_mask())
    scores = samples.buffer.matrix[rows].astype(np.float32) @ probe
    best: dict[int, tuple[float, int]] = {}
    for row, s in zip(rows.tolist(), scores.tolist(), strict=True):
        label = int(samples.buffer.labels[row])
        if label not in best or s > best[label][0]:
            best[label] = (s, int(samples.buffer.keys[row]))
    return {label: key for label, (_, key) in best.items()}


def _group_means(samples: Rows, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, unit mean vectors) of the identities owning `rows`, blockwise in memory."""
    if len(rows) == 0:
        return np.empty(0, np.int64), np.empty((0, samples.dim), np.float32)
    labels = samples.buffer.labels[rows]
    order = np.argsort(labels, kind="stable")
    rows, labels = rows[order], labels[order]
    uniq, starts = np.unique(labels, return_index=True)
    means = np.empty((len(uniq), samples.dim), np.float32)
    group_block = 16384
    for g in range(0, len(uniq), group_block):
        g_end = min(g + group_block, len(uniq))
        r0 = starts[g]
        r1 = starts[g_end] if g_end < len(uniq) else len(rows)
        block = samples.buffer.matrix[rows[r0:r1]].astype(np.float32)
        means[g:g_end] = np.add.reduceat(block, starts[g:g_end] - r0, axis=0)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return uniq, means / np.maximum(norms, 1e-12)


class HnswIndex(ExactIndex):
    """Approximate max-scoring search with a faiss HNSW graph over the same rows.

    The graph's ids are row numbers; tombstoned rows are filtered from over-fetched
    candidates until compaction rebuilds the graph. faiss does not allow adds during a
    search, so graph searches and updates share a lock (mean scoring stays exact).
    """

    kind = "hnsw"

    def __init__(self, dim: int, *args: object, m: int = 32, ef_search: int = 128, **kw) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise FailedPrecondition(
                "--gallery-index hnsw needs faiss-cpu: pip install faiss-cpu "
                "(or use --gallery-index exact)"
            ) from exc
        self._faiss = faiss
        self._m = m
        self.ef_search = ef_search
        self._graph_lock = threading.Lock()
        super().__init__(dim, *args, **kw)
        self._graph = self._new_graph()

    def _new_graph(self):
        graph = self._faiss.IndexHNSWFlat(self.dim, self._m, self._faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = 80
        return graph

    def _extra_bytes(self) -> int:
        # Flat fp32 copy plus about 2*M int32 neighbour ids per vector at level 0.
        return int(self._graph.ntotal) * (4 * self.dim + 8 * self._m)

    def apply(self, changes: list[Change]) -> None:
        with self._graph_lock:
            super().apply(changes)

    def _add_to_ann(self, first_row: int, vectors: np.ndarray) -> None:
        assert self._graph.ntotal == first_row
        self._graph.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def _rebuild_ann(self, samples: Rows) -> None:
        graph = self._new_graph()
        step = 65536
        for s in range(0, samples.n, step):
            graph.add(samples.matrix[s : s + step].astype(np.float32))
        self._graph = graph

    def _candidates(
        self, snap: Snapshot, probes: np.ndarray, want: int, should_stop: StopCheck = None
    ) -> tuple[np.ndarray, np.ndarray]:
        # Called with _graph_lock held, so the graph holds exactly the snapshot's rows.
        _check(should_stop, 0, snap.samples.n)
        dead = snap.samples.dead
        fetch = min(snap.samples.n, want + len(dead))
        if fetch == 0:
            return np.empty((len(probes), 0), np.float32), np.empty((len(probes), 0), np.int64)
        params = self._faiss.SearchParametersHNSW(efSearch=max(self.ef_search, fetch))
        scores, rows = self._graph.search(probes, fetch, params=params)
        # Missing results come back as -1; dead rows sink to the end with -inf.
        bad = (rows < 0) | np.isin(rows, dead)
        scores = np.where(bad, -np.inf, scores).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        scores = np.take_along_axis(scores, order, axis=1)[:, :want]
        rows = np.take_along_axis(rows, order, axis=1)[:, :want]
        return scores, rows

    def search(
        self,
        probes: np.ndarray,
        k: int,
        min_score: float | None,
        scoring: str = "max",
        should_stop: StopCheck = None,
    ) -> tuple[list[list[Hit]], int]:
        if scoring == "max":
            probes = np.ascontiguousarray(probes, dtype=np.float32)
            # The graph and the snapshot must describe the same rows for the whole search.
            with self._graph_lock:
                snap = self._snapshot
                return self._search_max(snap, probes, k, min_score, should_stop), snap.identities
        return super().search(probes, k, min_score, scoring, should_stop)


def create_index(
    kind: str,
    dim: int,
    dtype: str,
    chunk_bytes: int,
    compact_ratio: float,
    capacity: int = _MIN_CAPACITY,
    hnsw_m: int = 32,
    hnsw_ef_search: int = 128,
    device: str | None = None,
) -> ExactIndex:
    """An empty index; `device` None searches on the host, a torch device there (exact only)."""
    if kind == "hnsw":
        if device is not None:
            raise FailedPrecondition(
                "--gallery-index hnsw searches on the CPU: use --gallery-device cpu "
                "(or --gallery-index exact to search on the GPU)"
            )
        return HnswIndex(
            dim,
            dtype,
            chunk_bytes,
            compact_ratio,
            capacity,
            m=hnsw_m,
            ef_search=hnsw_ef_search,
        )
    return ExactIndex(dim, dtype, chunk_bytes, compact_ratio, capacity, device)
