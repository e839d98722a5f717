"""Graph sampling: blockwise kNN against brute force, and make_index semantics of the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaface_server.sampling.index import plan_epoch, shuffled_order, stream_samples
from adaface_server.sampling.knn import knn, knn_bruteforce
from adaface_server.sampling.knn_faiss import knn_faiss


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Prototypes with structure (clusters) so neighbourhoods are meaningful."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 8), dim))
    return (centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim))).astype(
        np.float32
    )


# -- kNN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 7, 64, 300, 1000])
def test_blockwise_knn_equals_brute_force(block):
    x = clustered(300, seed=block)
    got_idx, got_sims = knn(x, 15, block=block)
    want_idx, want_sims = knn_bruteforce(x, 15)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_sims, want_sims, atol=1e-5)
    assert not (got_idx == np.arange(300)[:, None]).any(), "a row is its own neighbour"


def test_knn_is_scale_invariant_and_orders_ties_by_index():
    x = clustered(50)
    x[10] = x[3] * 7.0  # same direction: similarity 1 to identity 3
    x[20] = x[3] * 0.5
    idx, sims = knn(x, 3, block=8)
    assert idx[3, :2].tolist() == [10, 20]
    assert idx[10, :2].tolist() == [3, 20]
    np.testing.assert_allclose(sims[3, :2], 1.0, atol=1e-6)


def test_knn_edge_cases():
    x = clustered(5)
    idx, sims = knn(x, 0)
    assert idx.shape == (5, 0) and sims.shape == (5, 0)
    idx, _ = knn(x, 4, block=2)
    assert sorted(idx[0].tolist()) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"k must be in 0\.\.N-1 = 4, got 5"):
        knn(x, 5)
    with pytest.raises(ValueError, match="precision"):
        knn(x, 1, precision="fp16")


def test_bf16_knn_is_approximate_with_high_recall():
    x = clustered(400, dim=128)
    want, _ = knn_bruteforce(x, 10)
    got, _ = knn(x, 10, block=100, precision="bf16")
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)])
    assert recall > 0.9


# -- make_index --------------------------------------------------------------------------


def seed_make_index(neighbours, counts, num_instance, seed, epochs):
    """The seed's make_index loop (QAConv GraphSampler.graph_index), epoch after epoch, with
    its global-random shuffles replaced by the documented keyed orders. Returns, per epoch,
    the unshuffled index (one group after another) of (identity, ordinal) pairs."""
    n = len(counts)
    cycles = [0] * n
    img_index = [shuffled_order(seed, j, 0, counts[j]).tolist() for j in range(n)]
    sam_pointer = [0] * n
    out = []
    for _ in range(epochs):
        sam_index = []
        for i in range(n):
            id_index = [*neighbours[i].tolist(), i]
            for j in id_index:
                len_p = counts[j]
                index_p = []
                remain = num_instance
                while remain > 0:
                    end = sam_pointer[j] + remain
                    idx = img_index[j][sam_pointer[j] : end]
                    index_p.extend((j, k) for k in idx)
                    remain -= len(idx)
                    sam_pointer[j] = end
                    if end >= len_p:
                        cycles[j] += 1
                        img_index[j] = shuffled_order(seed, j, cycles[j], len_p).tolist()
                        sam_pointer[j] = 0
                assert len(index_p) == num_instance
                sam_index.extend(index_p)
        out.append(sam_index)
    return out


def split(positions, counts):
    offsets = np.cumsum(counts) - counts
    ident = np.searchsorted(offsets, positions, side="right") - 1
    return ident, positions - offsets[ident]


def run_epochs(neighbours, counts, num_instance, seed, epochs):
    cursors = np.zeros(len(counts), np.uint64)
    results = []
    for epoch in range(epochs):
        plan = plan_epoch(neighbours, counts, cursors, num_instance, seed, epoch)
        positions = np.concatenate(list(plan.chunks(3)))
        results.append((plan, positions))
        cursors = plan.cursors
    return results


@pytest.fixture(scope="module")
def graph():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 9, size=40)  # includes identities with fewer samples than m
    x = clustered(40, seed=2)
    neighbours, _ = knn(x, 3)  # P = 4
    return x, neighbours, counts


def test_index_matches_the_seed_loop_over_epochs(graph):
    _, neighbours, counts = graph
    num_instance, seed = 4, 123
    reference = seed_make_index(neighbours, counts, num_instance, seed, epochs=3)
    for (plan, positions), want in zip(
        run_epochs(neighbours, counts, num_instance, seed, 3), reference, strict=True
    ):
        ident, ordinal = split(positions, counts)
        got = np.stack([ident, ordinal], 1).reshape(-1, plan.batch_size, 2)
        want = np.asarray(want).reshape(-1, plan.batch_size, 2)
        # Batch b of the epoch is group batch_order[b] of the unshuffled index.
        np.testing.assert_array_equal(got, want[plan.batch_order])


def test_index_properties(graph):
    x, neighbours, counts = graph
    batch_size, num_instance = 16, 4
    p = batch_size // num_instance
    ((plan, positions),) = run_epochs(neighbours, counts, num_instance, seed=5, epochs=1)
    n = len(counts)
    assert positions.size == plan.length == n * batch_size
    assert positions.min() >= 0 and positions.max() < counts.sum()
    ident, _ = split(positions, counts)
    batches = ident.reshape(n, p, num_instance)
    assert (batches == batches[:, :, :1]).all(), "num_instance consecutive of one identity"
    members = batches[:, :, 0]
    assert all(len(set(row)) == p for row in members), "P distinct identities per batch"
    anchors = members[:, -1]
    assert sorted(anchors.tolist()) == list(range(n)), "each identity anchors one batch"
    brute, _ = knn_bruteforce(x, p - 1)
    np.testing.assert_array_equal(members[:, :-1], brute[anchors])


def test_circular_pointer_covers_every_sample_before_repeating():
    counts = np.array([5, 3, 1, 7])
    for j, n_j in enumerate(counts):
        draws = np.arange(6 * n_j, dtype=np.uint64)
        stream = stream_samples(np.full(draws.size, j), draws, counts, seed=9)
        cycles = stream.reshape(6, n_j)
        for cycle in cycles:
            assert sorted(cycle.tolist()) == list(range(n_j))
        if n_j > 3:
            assert len({tuple(c) for c in cycles}) > 1, "reshuffled on wrap"


def test_epoch_draws_are_balanced_and_cursors_carry_over(graph):
    _, neighbours, counts = graph
    results = run_epochs(neighbours, counts, 4, seed=0, epochs=2)
    drawn = np.zeros(len(counts), np.int64)
    for plan, positions in results:
        ident, _ = split(positions, counts)
        drawn += np.bincount(ident, minlength=len(counts))
        np.testing.assert_array_equal(plan.cursors, drawn)
    # From cursor 0, a stream yields each sample n or n+1 times before any yields n+2.
    _, positions = results[0]
    per_sample = np.bincount(positions, minlength=counts.sum())
    offsets = np.cumsum(counts) - counts
    for j in range(len(counts)):
        mine = per_sample[offsets[j] : offsets[j] + counts[j]]
        assert mine.max() - mine.min() <= 1


def test_seeded_and_reproducible(graph):
    _, neighbours, counts = graph
    a = run_epochs(neighbours, counts, 4, seed=7, epochs=2)
    b = run_epochs(neighbours, counts, 4, seed=7, epochs=2)
    c = run_epochs(neighbours, counts, 4, seed=8, epochs=2)
    for (_, pa), (_, pb), (_, pc) in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(pa, pb)
        assert not np.array_equal(pa, pc)
    assert not np.array_equal(a[0][0].batch_order, a[1][0].batch_order), "epochs differ"


def test_chunking_does_not_change_the_index(graph):
    _, neighbours, counts = graph
    plan = plan_epoch(neighbours, counts, np.zeros(len(counts), np.uint64), 4, 3, 0)
    whole = np.concatenate(list(plan.chunks(10_000)))
    np.testing.assert_array_equal(whole, np.concatenate(list(plan.chunks(1))))


def test_shuffles_are_uniform_permutations_keyed_by_seed_identity_and_cycle():
    for n in (1, 2, 3, 17, 1000, 4097):
        assert sorted(shuffled_order(0, 3, 2, n).tolist()) == list(range(n))
    firsts = np.bincount([shuffled_order(1, 7, c, 5)[0] for c in range(5000)], minlength=5)
    assert (np.abs(firsts - 1000) < 150).all(), firsts
    base = shuffled_order(1, 7, 0, 50)
    for other in (
        shuffled_order(2, 7, 0, 50),
        shuffled_order(1, 8, 0, 50),
        shuffled_order(1, 7, 1, 50),
    ):
        assert not np.array_equal(base, other)


# -- faiss and device paths ---------------------------------------------------------------


def test_faiss_flat_equals_brute_force():
    x = clustered(500, dim=64, seed=3)
    got_idx, got_sims = knn_faiss(x, 12, method="flat")
    want_idx, want_sims = knn_bruteforce(x, 12)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_sims, want_sims, atol=1e-5)


def test_faiss_ivf_is_approximate_with_high_recall():
    x = clustered(3000, dim=64, seed=4)
    want, _ = knn_bruteforce(x, 15)
    got, sims = knn_faiss(x, 15, method="ivf", nprobe=16)
    assert got.shape == (3000, 15) and np.isfinite(sims).all()
    assert not (got == np.arange(3000)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 15 for a, b in zip(got, want, strict=True)])
    assert recall > 0.9, recall
    assert (np.diff(sims, axis=1) <= 0).all(), "most similar first"


def test_faiss_argument_checks():
    x = clustered(20)
    with pytest.raises(ValueError, match="method must be one of"):
        knn_faiss(x, 3, method="hnsw")
    with pytest.raises(ValueError, match=r"k must be in 0\.\.N-1 = 19, got 20"):
        knn_faiss(x, 20)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_tiles_on_a_device_equal_brute_force(device):
    x = clustered(700, seed=5)
    got_idx, got_sims = knn(x, 15, block=128, device=device)
    want_idx, want_sims = knn_bruteforce(x, 15)
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_sims, want_sims, atol=1e-5)


def test_knn_method_resolution(monkeypatch):
    from adaface_server.config import Settings, validate
    from adaface_server.sampling import neighbours

    cpu = Settings(sampling_knn_device="cpu")
    assert neighbours.resolve(cpu) == neighbours.KnnMethod("faiss-flat", "cpu", "fp32")
    bf16 = Settings(sampling_knn_device="cpu", sampling_knn_precision="bf16")
    assert neighbours.resolve(bf16) == neighbours.KnnMethod("tiles", "cpu", "bf16")
    ivf = Settings(sampling_knn_device="cpu", sampling_knn_method="faiss-ivf")
    assert neighbours.resolve(ivf).label == "ivf"
    gpu = Settings(sampling_knn_device="cuda")
    assert neighbours.resolve(gpu) == neighbours.KnnMethod("tiles", "cuda", "fp32")
    monkeypatch.setattr(neighbours.knn_faiss, "available", lambda: False)
    assert neighbours.resolve(cpu).method == "tiles"
    with pytest.raises(ValueError, match="--sampling-knn-method faiss-ivf needs faiss"):
        neighbours.resolve(ivf)
    problems = validate(Settings(sampling_knn_method="hnsw", sampling_knn_device="tpu"))
    assert any("--sampling-knn-method must be auto, tiles" in p for p in problems)
    assert any("--sampling-knn-device must be auto, cpu or cuda" in p for p in problems)


@pytest.mark.parametrize("method", ["tiles", "faiss-flat", "faiss-ivf"])
def test_every_method_gives_the_exact_graph_on_small_data(method):
    from adaface_server.config import Settings
    from adaface_server.sampling import neighbours

    settings = Settings(sampling_knn_device="cpu", sampling_knn_method=method)
    x = clustered(60, seed=6)  # this small, IVF probes every list: exact
    got = neighbours.neighbours(x, 5, neighbours.resolve(settings), settings)
    np.testing.assert_array_equal(got, knn_bruteforce(x, 5)[0])
