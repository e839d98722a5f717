"""Gallery indexes against brute force: top-k, fp16, tombstones, compaction, templates."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from adaface_server.gallery.index import (
    Change,
    ExactIndex,
    HnswIndex,
    Rows,
    Stopped,
    top_rows,
)

DIM = 64


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 3000
    vectors = unit(rng.standard_normal((n, DIM)))
    labels = rng.integers(1, 700, n).astype(np.int64)
    probes = unit(rng.standard_normal((7, DIM)))
    return vectors, labels, probes


def filled(index: ExactIndex, vectors, labels) -> ExactIndex:
    names = {int(lb): f"id{lb}" for lb in np.unique(labels)}
    index.apply(
        [
            Change(
                add_keys=np.arange(1, len(vectors) + 1),
                add_labels=labels,
                add_vectors=vectors,
                names=names,
                identity_delta=len(names),
            )
        ]
    )
    return index


def brute_max(vectors, labels, probe, k, alive=None):
    scores = vectors @ probe
    best: dict[int, tuple[float, int]] = {}
    for row, (lb, s) in enumerate(zip(labels.tolist(), scores.tolist(), strict=True)):
        if alive is not None and not alive[row]:
            continue
        if lb not in best or s > best[lb][0]:
            best[lb] = (s, row + 1)
    return sorted(((lb, s, key) for lb, (s, key) in best.items()), key=lambda x: -x[1])[:k]


def brute_mean(vectors, labels, probe, k):
    out = []
    for lb in np.unique(labels):
        t = vectors[labels == lb].sum(0)
        out.append((int(lb), float(t @ probe / np.linalg.norm(t))))
    return sorted(out, key=lambda x: -x[1])[:k]


@pytest.mark.parametrize("chunk_bytes", [1 << 12, 64 << 20])
def test_exact_top_k_equals_brute_force(data, chunk_bytes):
    vectors, labels, probes = data
    index = filled(ExactIndex(DIM, chunk_bytes=chunk_bytes), vectors, labels)
    hits, searched = index.search(probes, 10, None)
    assert searched == len(np.unique(labels))
    for probe, got in zip(probes, hits, strict=True):
        expected = brute_max(vectors, labels, probe, 10)
        assert [(h.label, h.sample_id) for h in got] == [(lb, key) for lb, _, key in expected]
        np.testing.assert_allclose([h.score for h in got], [s for _, s, _ in expected], atol=1e-5)
        assert got[0].identity == f"id{expected[0][0]}"


def test_top_rows_matches_argsort(data):
    vectors, labels, probes = data
    rows = Rows.empty(DIM, np.float32).appended(np.arange(len(vectors)), labels, vectors)
    scores, found = top_rows(rows, probes, 25, chunk_bytes=1 << 12)
    full = probes @ vectors.T
    np.testing.assert_array_equal(found, np.argsort(-full, axis=1)[:, :25])
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :25], atol=1e-6)


def test_float16_storage_is_close(data):
    vectors, labels, probes = data
    index = filled(ExactIndex(DIM, dtype="float16", chunk_bytes=1 << 14), vectors, labels)
    assert index.snapshot.samples.matrix.dtype == np.float16
    hits, _ = index.search(probes, 5, None)
    for probe, got in zip(probes, hits, strict=True):
        expected = brute_max(vectors, labels, probe, 5)
        np.testing.assert_allclose([h.score for h in got], [s for _, s, _ in expected], atol=2e-3)
        assert got[0].label == expected[0][0]


@pytest.mark.parametrize("chunk_bytes", [1 << 12, 1 << 20])
def test_float16_rows_give_the_exact_top_k_of_the_stored_vectors(chunk_bytes):
    """Crowded near-ties (rows 1e-4 apart, below fp16's resolution of a score) that a top-k
    picked by fp16 scores alone gets wrong; with the margin and fp32 rescoring the result is
    the exact fp32 top-k of the stored fp16 vectors, ties by row, tombstones skipped."""
    rng = np.random.default_rng(7)
    base = unit(rng.standard_normal((1, DIM)))
    crowd = unit(base + 2e-4 * rng.standard_normal((1500, DIM)))
    others = unit(rng.standard_normal((2500, DIM)))
    vectors = np.concatenate([others[:1000], crowd, others[1000:]]).astype(np.float16)
    rows = Rows.empty(DIM, np.float16).appended(
        np.arange(len(vectors)), np.zeros(len(vectors), np.int64), vectors
    )
    dead = np.sort(rng.choice(len(vectors), 300, replace=False))
    rows = Rows(rows.buffer, rows.n, dead)
    probes = unit(base + 0.01 * rng.standard_normal((5, DIM)))
    exact = probes @ vectors.astype(np.float32).T
    exact[:, dead] = -np.inf
    for k in (1, 10, 40):
        scores, found = top_rows(rows, probes, k, chunk_bytes=chunk_bytes)
        for p in range(len(probes)):
            # The fp32 k best up to summation order (BLAS here, einsum there: 1e-7 apart).
            best = -np.sort(-exact[p])[:k]
            np.testing.assert_allclose(scores[p], best, rtol=0, atol=1e-6)
            np.testing.assert_allclose(exact[p, found[p]], best, rtol=0, atol=1e-6)
            assert len(set(found[p].tolist())) == k
            for i in range(k - 1):  # best first, ties by row
                s_i, s_j, r_i, r_j = scores[p, i], scores[p, i + 1], found[p, i], found[p, i + 1]
                assert s_i > s_j or (s_i == s_j and r_i < r_j)


def test_tombstones_then_compaction(data):
    vectors, labels, probes = data
    index = filled(ExactIndex(DIM, compact_ratio=0.5), vectors, labels)
    alive = np.ones(len(vectors), bool)
    removed = np.arange(1, len(vectors) + 1)[::3]  # keys of every third row
    alive[removed - 1] = False
    index.apply([Change(remove_keys=removed)])
    snap = index.snapshot
    assert snap.samples.n == len(vectors) and len(snap.samples.dead) == len(removed)
    hits, _ = index.search(probes, 10, None)
    for probe, got in zip(probes, hits, strict=True):
        expected = brute_max(vectors, labels, probe, 10, alive)
        assert [(h.label, h.sample_id) for h in got] == [(lb, key) for lb, _, key in expected]
    # Crossing the ratio compacts: dead rows are dropped, results unchanged.
    more = np.arange(2, len(vectors) + 1, 3)
    alive[more - 1] = False
    index.apply([Change(remove_keys=more)])
    snap = index.snapshot
    assert snap.samples.n == int(alive.sum()) and len(snap.samples.dead) == 0
    np.testing.assert_array_equal(snap.samples.keys, np.flatnonzero(alive) + 1)
    hits, _ = index.search(probes, 10, None)
    for probe, got in zip(probes, hits, strict=True):
        expected = brute_max(vectors, labels, probe, 10, alive)
        assert [(h.label, h.sample_id) for h in got] == [(lb, key) for lb, _, key in expected]


def test_mean_template_scoring(data):
    vectors, labels, probes = data
    index = filled(ExactIndex(DIM), vectors[:1500], labels[:1500])
    hits, _ = index.search(probes, 5, None, "mean")  # builds the templates
    # Later writes keep the templates current.
    index.apply(
        [
            Change(
                add_keys=np.arange(1501, 3001),
                add_labels=labels[1500:],
                add_vectors=vectors[1500:],
                names={int(lb): f"id{lb}" for lb in labels[1500:]},
            )
        ]
    )
    hits, _ = index.search(probes, 5, None, "mean")
    for probe, got in zip(probes, hits, strict=True):
        expected = brute_mean(vectors, labels, probe, 5)
        assert [h.label for h in got] == [lb for lb, _ in expected]
        np.testing.assert_allclose([h.score for h in got], [s for _, s in expected], atol=1e-5)
        # The best sample is reported for template matches too.
        rows = np.flatnonzero(labels == got[0].label)
        assert got[0].sample_id == rows[np.argmax(vectors[rows] @ probe)] + 1


def test_min_score_cuts_results(data):
    vectors, labels, probes = data
    index = filled(ExactIndex(DIM), vectors, labels)
    full, _ = index.search(probes[:1], 10, None)
    cut, _ = index.search(probes[:1], 10, full[0][3].score)
    assert [h.label for h in cut[0]] == [h.label for h in full[0][:4]]


def test_identities_with_many_close_samples_need_a_second_pass():
    rng = np.random.default_rng(1)
    probe = unit(rng.standard_normal((1, DIM)))
    # Identity 1 owns the 50 best rows: the first pass (4*k rows) sees one identity only.
    near = unit(probe + 0.01 * rng.standard_normal((50, DIM)))
    far = unit(rng.standard_normal((200, DIM)))
    vectors = np.concatenate([near, far])
    labels = np.concatenate([np.ones(50, np.int64), np.arange(2, 202)])
    index = filled(ExactIndex(DIM), vectors, labels)
    hits, _ = index.search(probe, 3, None)
    expected = brute_max(vectors, labels, probe[0], 3)
    assert [h.label for h in hits[0]] == [lb for lb, _, _ in expected]


def test_snapshots_are_never_partial():
    """A reader holding or taking snapshots sees each change whole: identity i has either
    all of its 4 rows or none, while the writer appends, removes and grows the buffer."""
    index = ExactIndex(DIM, capacity=8, compact_ratio=0.3)
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            snap = index.snapshot
            rows = snap.samples
            alive = rows.alive_mask()
            counts = np.bincount(rows.labels[alive], minlength=1)
            bad = np.flatnonzero((counts != 0) & (counts != 4))
            if bad.size:
                problems.append(f"label {bad[0]} has {counts[bad[0]]} rows")
            if snap.identities != int((counts > 0).sum()):
                problems.append(f"count {snap.identities} != {(counts > 0).sum()}")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(2)
    key = 0
    try:
        for i in range(1, 800):
            keys = np.arange(key + 1, key + 5)
            key += 4
            index.apply(
                [
                    Change(
                        add_keys=keys,
                        add_labels=np.full(4, i),
                        add_vectors=unit(rng.standard_normal((4, DIM))),
                        names={i: str(i)},
                        identity_delta=1,
                    )
                ]
            )
            if i % 3 == 0:
                gone = (i - 2) * 4
                index.apply([Change(remove_keys=np.arange(gone - 3, gone + 1), identity_delta=-1)])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not problems, problems[:3]


def test_hnsw_recall_and_removals(data):
    pytest.importorskip("faiss")
    vectors, labels, probes = data
    index = filled(HnswIndex(DIM, m=16, ef_search=200), vectors, labels)
    assert index.kind == "hnsw"
    hits, _ = index.search(probes, 10, None)
    found = sum(
        len({h.label for h in got} & {lb for lb, _, _ in brute_max(vectors, labels, p, 10)})
        for p, got in zip(probes, hits, strict=True)
    )
    assert found / (10 * len(probes)) >= 0.9
    top = hits[0][0]
    index.apply([Change(remove_keys=np.asarray([top.sample_id]))])
    again, _ = index.search(probes[:1], 10, None)
    assert all(h.sample_id != top.sample_id for h in again[0])


def test_many_probes_take_the_bf16_pass_and_stay_exact(data):
    vectors, labels, _ = data
    rng = np.random.default_rng(5)
    many = unit(vectors[rng.integers(0, len(vectors), 80)] + 0.2 * rng.standard_normal((80, DIM)))
    rows = Rows.empty(DIM, np.float32).appended(np.arange(len(vectors)), labels, vectors)
    rows = rows.without(np.arange(0, len(vectors), 7))
    scores, found = top_rows(rows, many, 30, chunk_bytes=1 << 16)
    full = many @ vectors.T
    full[:, rows.dead] = -np.inf
    np.testing.assert_array_equal(found, np.argsort(-full, axis=1, kind="stable")[:, :30])
    np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :30], atol=1e-6)


class Countdown:
    """A should_stop that says "stop" once it has been asked `after` times."""

    def __init__(self, after: int) -> None:
        self.after, self.asked = after, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked > self.after


@pytest.mark.parametrize(("probes", "scoring"), [(7, "max"), (80, "max"), (7, "mean")])
def test_a_search_told_to_stop_stops_between_chunks(probes, scoring):
    """fp32 (few probes), the bf16 pass (many probes) and mean scoring all ask between chunks;
    a search that is never told to stop gives the same answer as one without the check."""
    rng = np.random.default_rng(9)
    vectors = unit(rng.standard_normal((20_000, DIM)))  # 5 chunks: at least 4096 rows each
    # Mean scoring scans one template per identity: give it as many identities as rows.
    labels = np.arange(1, len(vectors) + 1) if scoring == "mean" else rng.integers(1, 900, 20_000)
    many = unit(rng.standard_normal((probes, DIM)))
    index = filled(ExactIndex(DIM, chunk_bytes=1 << 12), vectors, labels)
    stop = Countdown(after=2)
    with pytest.raises(Stopped, match=r"search stopped at row \d+ of \d+"):
        index.search(many, 5, None, scoring, should_stop=stop)
    assert stop.asked == 3  # stopped at the third chunk, not at the end
    never = Countdown(after=10**9)
    hits, _ = index.search(many, 5, None, scoring, should_stop=never)
    assert never.asked > 3  # every chunk asked
    assert hits == index.search(many, 5, None, scoring)[0]


@pytest.mark.parametrize("k", [3, 40, 200])
def test_equal_scores_rank_by_row(k):
    """Of rows with equal scores the lowest rows come first and win at the k-th place,
    whatever order torch.topk returns them in."""
    rng = np.random.default_rng(12)
    vectors = unit(rng.standard_normal((5000, DIM)))
    vectors[50:5000:9] = vectors[7]  # 551 copies
    rows = Rows.empty(DIM, np.float32).appended(np.arange(5000), np.arange(5000), vectors)
    copies = np.concatenate([[7], np.arange(50, 5000, 9)])
    for chunk_bytes in (1 << 12, 64 << 20):
        scores, found = top_rows(rows, vectors[7:8], k, chunk_bytes)
        np.testing.assert_array_equal(found[0], copies[:k])
        assert len(set(scores[0].tolist())) == 1
