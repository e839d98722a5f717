"""GraphSampler without a server: argument checks, the server address, len(), DDP ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaface_client import GraphSampler
from adaface_client.prototypes import matcher_knn
from adaface_client.sampling import distributed_rank, resolve_server

# 29 identities with 1-5 samples, interleaved as a real dataset's order would be.
_rng = np.random.default_rng(2)
DATA = [(f"{pid}_{k}.jpg", pid, 0) for pid in range(29) for k in range(int(_rng.integers(1, 6)))]
_rng.shuffle(DATA)
FEATS = torch.from_numpy(_rng.standard_normal((len(DATA), 12)).astype(np.float32))


def features(indices):
    return FEATS[indices]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for name in ("ADAFACE_SERVER", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "value", ["localhost:50051", "127.0.0.1:1", "[::1]:8001", "face-api.internal.example:443"]
)
def test_server_accepts_host_port(value):
    assert resolve_server(value) == value


@pytest.mark.parametrize(
    "value", ["data/images", "localhost", ":50051", "localhost:0", "localhost:70000", "a b:1"]
)
def test_server_refuses_anything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^server: expected 'host:port'") as info:
        resolve_server(value)
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=r"^ADAFACE_SERVER: expected 'host:port'"):
        resolve_server(None, {"ADAFACE_SERVER": value})
    assert resolve_server(None, {}) is None


def test_server_from_the_environment(monkeypatch):
    monkeypatch.setenv("ADAFACE_SERVER", "localhost:50051")
    sampler = GraphSampler(DATA, "images/", batch_size=8, num_instance=2)
    assert sampler.target == "localhost:50051" and sampler.img_path == "images/"
    monkeypatch.setenv("ADAFACE_SERVER", "images/")
    with pytest.raises(ValueError, match="ADAFACE_SERVER: expected 'host:port'"):
        GraphSampler(DATA, "images/", batch_size=8, num_instance=2)


def test_served_prototypes_need_a_server():
    with pytest.raises(ValueError, match=r"^server: prototypes embedded by the served model"):
        GraphSampler(DATA, "data/images", batch_size=8, num_instance=2)
    # The old call shape (address second) is caught, not taken as a folder.
    for extra in ({}, {"features": features}):
        with pytest.raises(ValueError, match=r"^img_path: 'localhost:50051' looks like a server"):
            GraphSampler(DATA, "localhost:50051", batch_size=8, num_instance=2, **extra)
    with pytest.raises(ValueError, match="first_pass must be one of"):
        GraphSampler(DATA, features=features, batch_size=8, num_instance=2, first_pass="x")
    with pytest.raises(TypeError, match="matcher must be callable"):
        GraphSampler(DATA, None, None, None, "euclidean", features=features)


def test_len_is_the_epoch_length_from_the_start():
    sampler = GraphSampler(DATA, features=features, batch_size=8, num_instance=2)
    assert len(sampler) == 29 * 8
    assert len(list(sampler)) == len(sampler)


def test_ranks_get_disjoint_whole_batches_of_the_same_epoch(monkeypatch):
    whole = GraphSampler(DATA, features=features, batch_size=8, num_instance=2, seed=4)
    epochs = [np.asarray(list(whole)).reshape(-1, 8) for _ in range(2)]
    for epoch, full in enumerate(epochs):
        parts = []
        for rank in range(3):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "3")
            sampler = GraphSampler(DATA, features=features, batch_size=8, num_instance=2, seed=4)
            if epoch:  # the cursors carry over: replay epoch 0 first
                list(sampler)
            order = list(sampler)
            assert len(order) == len(sampler) == (29 // 3) * 8
            parts.append(np.asarray(order).reshape(-1, 8))
        # Rank r has batches r, r+3, ... of the single-process epoch: whole, disjoint, equal.
        for rank, part in enumerate(parts):
            np.testing.assert_array_equal(part, full[rank:27:3])
        seen = {tuple(b) for p in parts for b in p}
        assert len(seen) == 27 and seen <= {tuple(b) for b in full}


def test_rank_arguments_are_checked():
    assert distributed_rank(None, None, {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert distributed_rank(1, 2, {}) == (1, 2)
    assert distributed_rank(None, None, {}) == (0, 1)
    with pytest.raises(ValueError, match="need 0 <= rank < world_size, got rank 4"):
        distributed_rank(None, None, {"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE must be integers"):
        distributed_rank(None, None, {"RANK": "one"})
    with pytest.raises(ValueError, match="world_size 40 is more than the 29 batches"):
        GraphSampler(DATA, features=features, batch_size=8, num_instance=2, world_size=40, rank=0)


@pytest.mark.parametrize(("prob", "gal"), [(1, 1), (5, 7), (64, 3), (100, 100)])
def test_matcher_knn_equals_the_full_matrix(prob, gal):
    x = FEATS[:40].double()
    full = torch.cdist(x, x) + torch.eye(40, dtype=torch.float64) * 1e15
    want = torch.argsort(full, dim=1, stable=True)[:, :5].numpy()
    got = matcher_knn(x, 5, lambda p, g: torch.cdist(p, g), prob, gal)
    np.testing.assert_array_equal(got, want)
