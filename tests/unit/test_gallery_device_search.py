"""Gallery search on a torch device (device_search) against the host path and brute force.

The device path runs here with torch on "cpu": the same code as on CUDA (fp16 mirror,
chunked topk with a margin, fp32 rescoring on the host). The CUDA-marked test repeats the
parity on a GPU where one exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaface_server.config import parse_settings
from adaface_server.errors import FailedPrecondition
from adaface_server.gallery import device_search
from adaface_server.gallery.device_search import DeviceMirror
from adaface_server.gallery.index import Change, ExactIndex, Rows, Stopped, create_index

from .test_gallery_index import Countdown

DIM = 64
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def add(keys: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> Change:
    names = {int(lb): f"id{lb}" for lb in np.unique(labels)}
    return Change(add_keys=keys, add_labels=labels, add_vectors=vectors, names=names)


def reference_rows(rows: Rows, probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every live row by fp32 score of the stored vector, best first, ties by row."""
    live = np.flatnonzero(rows.alive_mask())
    matrix = rows.matrix[live].astype(np.float32)
    scores = np.einsum("nd,nd->n", matrix, np.broadcast_to(probe, matrix.shape))
    order = np.lexsort((live, -scores))
    return scores[order], live[order]


def reference_max(index: ExactIndex, probe: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """(label, sample key, score) of the k best identities by their best sample."""
    samples = index.snapshot.samples
    scores, rows = reference_rows(samples, probe)
    labels = samples.labels[rows]
    _, first = np.unique(labels, return_index=True)
    first.sort()
    return [(int(labels[i]), int(samples.keys[rows[i]]), float(scores[i])) for i in first[:k]]


def reference_mean(index: ExactIndex, probe: np.ndarray, k: int) -> list[tuple[int, float]]:
    templates = index.snapshot.templates
    scores, rows = reference_rows(templates, probe)
    return [(int(templates.labels[r]), float(s)) for r, s in zip(rows[:k], scores[:k], strict=True)]


def hits_max(hits) -> list[tuple[int, int, float]]:
    return [(h.label, h.sample_id, h.score) for h in hits]


def assert_same(got: list[tuple], expected: list[tuple]) -> None:
    """Identical identities (and samples) in the same order; scores to fp32 rounding."""
    assert [g[:-1] for g in got] == [e[:-1] for e in expected]
    np.testing.assert_allclose([g[-1] for g in got], [e[-1] for e in expected], rtol=1e-6)


def check_all(
    device: ExactIndex, host: ExactIndex, probes: np.ndarray, k: int, compare_host: bool = True
) -> None:
    """The device index answers exactly as brute force, and as the host index (fp32; the
    host's fp16 storage picks its candidates in fp16, without a margin)."""
    for scoring in ("max", "mean"):
        got, count = device.search(probes, k, None, scoring)
        want, host_count = host.search(probes, k, None, scoring)
        assert count == host_count
        for j, probe in enumerate(probes):
            if scoring == "max":
                assert_same(hits_max(got[j]), reference_max(device, probe, k))
            else:
                ref = reference_mean(device, probe, k)
                assert_same([(h.label, h.score) for h in got[j]], ref)
                samples = device.snapshot.samples
                _, rows = reference_rows(samples, probe)
                for h in got[j]:  # the identity's best sample (its first on equal scores)
                    first = rows[samples.labels[rows] == h.label][0]
                    assert h.sample_id == samples.keys[first]
            if host.dtype == "float32" and compare_host:
                assert_same(
                    [(h.label, h.sample_id, h.score) for h in got[j]],
                    [(h.label, h.sample_id, h.score) for h in want[j]],
                )


def gallery(n: int, identities: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return unit(rng.standard_normal((n, DIM))), rng.integers(1, identities, n).astype(np.int64)


def probes_for(vectors: np.ndarray, q: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    near = vectors[rng.integers(0, len(vectors), q)] + 0.3 * rng.standard_normal((q, DIM))
    return unit(near)


@pytest.mark.parametrize(
    ("n", "dtype", "chunk_bytes", "k", "q"),
    [
        (300, "float32", 64 << 20, 1, 1),
        (3000, "float32", 1 << 12, 10, 1),
        (3000, "float32", 1 << 14, 25, 80),  # 80 probes: the host side takes its bf16 pass
        (12000, "float32", 64 << 20, 5, 7),
        (3000, "float16", 1 << 12, 10, 1),
        (12000, "float16", 1 << 16, 3, 80),
    ],
)
def test_device_path_matches_host_and_brute_force_through_writes(n, dtype, chunk_bytes, k, q):
    vectors, labels = gallery(n, max(2, n // 4), seed=n + k)
    probes = probes_for(vectors, q, seed=k)
    kw = dict(dtype=dtype, chunk_bytes=chunk_bytes, compact_ratio=0.3, capacity=n // 2)
    device, host = ExactIndex(DIM, device="cpu", **kw), ExactIndex(DIM, **kw)
    half = n // 2
    keys = np.arange(1, n + 1)
    for index in (device, host):
        index.apply([add(keys[:half], labels[:half], vectors[:half])])
        index.search(probes[:1], k, None, "mean")  # templates exist from here on
    check_all(device, host, probes, k)
    # Appends beyond the capacity grow the host buffer and the device copy.
    for index in (device, host):
        index.apply([add(keys[half:], labels[half:], vectors[half:])])
    check_all(device, host, probes, k)
    # Tombstones (below the compaction ratio), then enough removals to compact.
    for index in (device, host):
        index.apply([Change(remove_keys=keys[::5])])
    assert len(device.snapshot.samples.dead) == len(keys[::5])
    check_all(device, host, probes, k)
    for index in (device, host):
        index.apply([Change(remove_keys=keys[1::5]), Change(remove_keys=keys[2::7])])
    # Compaction needs more than 1024 removed rows.
    assert (len(device.snapshot.samples.dead) == 0) == (n >= 3000)
    check_all(device, host, probes, k)


def test_ties_are_ordered_by_row_like_the_host_path():
    """Exact duplicates across and within identities: equal scores, earlier rows first."""
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((4000, DIM)))
    vectors[100:4000:7] = vectors[5]  # 557 copies of row 5, in many identities
    labels = rng.integers(1, 1500, 4000).astype(np.int64)
    probes = np.concatenate([vectors[5:6], unit(vectors[5:6] + 0.05), probes_for(vectors, 78, 1)])
    device, host = ExactIndex(DIM, device="cpu"), ExactIndex(DIM)
    for index in (device, host):
        index.apply([add(np.arange(1, 4001), labels, vectors)])
    for q in (1, 2, 80):
        for k in (1, 10, 50):
            check_all(device, host, probes[:q], k)
    hits, _ = device.search(probes[:1], 10, None)
    assert len({h.score for h in hits[0]}) == 1  # ten tied identities


def test_crowded_probes_are_rescanned_above_the_threshold(monkeypatch):
    """Hundreds of rows within the fp16 margin of the k-th score: the candidates cannot
    prove coverage, so the probe is scanned again and stays exact."""
    rng = np.random.default_rng(4)
    base = unit(rng.standard_normal((1, DIM)))
    crowd = unit(base + 1e-4 * rng.standard_normal((600, DIM)))
    vectors = np.concatenate([unit(rng.standard_normal((5000, DIM))), crowd])
    labels = np.arange(1, len(vectors) + 1)
    scans = []
    real = device_search._scan_above
    monkeypatch.setattr(
        device_search, "_scan_above", lambda *a: scans.append(a[2].shape[0]) or real(*a)
    )
    device, host = ExactIndex(DIM, device="cpu", chunk_bytes=1 << 12), ExactIndex(DIM)
    for index in (device, host):
        index.apply([add(labels, labels, vectors)])
    probes = np.concatenate([base, probes_for(vectors, 3, 2)])
    # The crowd's fp32 scores differ in the last bits only, where the host's BLAS and the
    # rescoring round differently: brute force (same rounding as the rescoring) decides.
    check_all(device, host, probes, 5, compare_host=False)
    assert scans and scans[0] == 1  # only the crowded probe was rescanned


def test_mirror_copies_only_new_rows_and_rebuilds_after_compaction():
    vectors, labels = gallery(3000, 900, seed=6)
    index = ExactIndex(DIM, device="cpu", capacity=2000, compact_ratio=0.25)
    index.apply([add(np.arange(1, 1001), labels[:1000], vectors[:1000])])
    first = index.snapshot.device_samples
    index.apply([add(np.arange(1001, 1501), labels[1000:1500], vectors[1000:1500])])
    second = index.snapshot.device_samples
    assert second.matrix.data_ptr() == first.matrix.data_ptr()  # appended in place
    assert second.dead_host is index.snapshot.samples.dead
    index.apply([add(np.arange(1501, 3001), labels[1500:], vectors[1500:])])
    grown = index.snapshot.device_samples
    assert grown.matrix.data_ptr() != first.matrix.data_ptr()
    assert grown.lineage is first.lineage  # same rows carried over on the device
    snap = index.snapshot
    np.testing.assert_array_equal(
        grown.matrix[: grown.n].numpy(), snap.samples.matrix.astype(np.float16)
    )
    # An older snapshot still searches its own rows while newer ones are written.
    old_probe = probes_for(vectors[:1000], 1, seed=1)
    index.apply([Change(remove_keys=np.arange(1, 1201))])  # compacts
    compacted = index.snapshot.device_samples
    assert compacted.lineage is not first.lineage and compacted.n == 1800
    np.testing.assert_array_equal(
        compacted.matrix[: compacted.n].numpy(), vectors[1200:].astype(np.float16)
    )
    scores, rows = device_search.top_rows(
        first, _rows_of(first, vectors[:1000], labels[:1000]), old_probe, 5, 1 << 20
    )
    ref_scores, ref_rows = reference_rows(_rows_of(first, vectors[:1000], labels[:1000]), old_probe)
    np.testing.assert_array_equal(rows[0], ref_rows[:5])
    np.testing.assert_allclose(scores[0], ref_scores[:5], rtol=1e-6)


def _rows_of(dev, vectors, labels) -> Rows:
    rows = Rows.empty(DIM, np.float32).appended(np.arange(1, len(labels) + 1), labels, vectors)
    return Rows(rows.buffer, rows.n, dev.dead_host)


def test_mirror_sync_without_changes_is_free():
    vectors, labels = gallery(500, 100, seed=8)
    rows = Rows.empty(DIM, np.float32).appended(np.arange(1, 501), labels, vectors)
    mirror = DeviceMirror("cpu")
    state = mirror.sync(rows)
    assert mirror.sync(rows) is state
    assert mirror.sync(rows.without(np.asarray([3]))).matrix is state.matrix


@pytest.mark.parametrize("scoring", ["max", "mean"])
def test_device_search_told_to_stop_stops_between_chunks(scoring):
    rng = np.random.default_rng(9)
    vectors = unit(rng.standard_normal((20_000, DIM)))  # 5 chunks: at least 4096 rows each
    labels = np.arange(1, 20_001) if scoring == "mean" else rng.integers(1, 900, 20_000)
    index = ExactIndex(DIM, device="cpu", chunk_bytes=1 << 12)
    index.apply([add(np.arange(1, 20_001), labels, vectors)])
    probes = unit(rng.standard_normal((3, DIM)))
    stop = Countdown(after=2)
    with pytest.raises(Stopped, match=r"search stopped at row \d+ of \d+"):
        index.search(probes, 5, None, scoring, should_stop=stop)
    assert stop.asked == 3
    never = Countdown(after=10**9)
    hits, _ = index.search(probes, 5, None, scoring, should_stop=never)
    assert never.asked > 3
    assert hits == index.search(probes, 5, None, scoring)[0]


def test_hnsw_stays_on_the_cpu():
    with pytest.raises(FailedPrecondition, match="--gallery-index hnsw searches on the CPU"):
        create_index("hnsw", DIM, "float32", 1 << 20, 0.25, device="cpu")


def test_gallery_device_settings(capsys):
    assert parse_settings([], env={}).gallery_device == "cpu"
    for argv, message in (
        (["--gallery-device", "gpu"], "--gallery-device must be cpu, cuda or cuda:N, got 'gpu'"),
        (["--gallery-device", "cuda:x"], "--gallery-device must be cpu, cuda or cuda:N"),
        (
            ["--gallery-device", "cuda", "--gallery-index", "hnsw"],
            "--gallery-device cuda needs --gallery-index exact",
        ),
    ):
        with pytest.raises(SystemExit):
            parse_settings(argv, env={})
        assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cuda_gallery_device_is_refused_at_start_without_cuda(capsys):
    for argv, env in (
        (["--gallery-device", "cuda"], {}),
        ([], {"ADAFACE_GALLERY_DEVICE": "cuda:0"}),
    ):
        with pytest.raises(SystemExit):
            parse_settings(argv, env=env)
        err = capsys.readouterr().err
        assert "no CUDA device is available" in err and "use --gallery-device cpu" in err


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_device_path_matches_host_and_brute_force(dtype):
    vectors, labels = gallery(20_000, 5000, seed=11)
    vectors[100:20_000:97] = vectors[7]  # ties too
    keys = np.arange(1, 20_001)
    device = ExactIndex(DIM, dtype=dtype, device="cuda", chunk_bytes=1 << 16, capacity=10_000)
    host = ExactIndex(DIM, dtype=dtype, chunk_bytes=1 << 16, capacity=10_000)
    probes = np.concatenate([vectors[7:8], probes_for(vectors, 79, seed=2)])
    for index in (device, host):
        index.apply([add(keys[:12_000], labels[:12_000], vectors[:12_000])])
        index.search(probes[:1], 5, None, "mean")
        index.apply([add(keys[12_000:], labels[12_000:], vectors[12_000:])])
        index.apply([Change(remove_keys=keys[::9])])
    assert device.snapshot.device_samples.matrix.is_cuda
    for q, k in ((1, 1), (1, 10), (80, 10), (80, 50)):
        check_all(device, host, probes[:q], k)
    for index in (device, host):
        index.apply([Change(remove_keys=keys[1::3])])  # compacts
    check_all(device, host, probes, 10)
    assert device_search.resolve_device("cuda") == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("cpu", None), pytest.param("cuda", "cuda", marks=[pytest.mark.cuda, CUDA])],
)
def test_gallery_service_builds_indexes_on_the_gallery_device(tmp_path, setting, expected):
    from adaface_server.config import Settings
    from adaface_server.gallery.service import GalleryService

    settings = Settings(gallery_path=tmp_path / "g.sqlite3", gallery_device=setting)
    service = GalleryService(settings, None)  # type: ignore[arg-type]
    try:
        assert service._new_index(DIM).device == expected
    finally:
        service._reads.shutdown()
