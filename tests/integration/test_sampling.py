"""Sampling.BuildEpoch and GraphSampler against a real server: index, errors, DataLoader."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch.utils.data
from PIL import Image

from adaface.v1 import common_pb2, sampling_pb2, sampling_pb2_grpc
from adaface_client import (
    Client,
    GraphSampler,
    InvalidArgument,
    ResourceExhausted,
    make_image_input,
)
from adaface_client.sampling import build_epoch
from adaface_server.sampling.index import plan_epoch
from adaface_server.sampling.knn import knn, knn_bruteforce

from .server_harness import ServerThread, server_settings


def clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 6), dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def crop(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)


def identities_of(positions: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum(counts) - counts
    ident = np.searchsorted(offsets, positions, side="right") - 1
    return ident, positions - offsets[ident]


# -- the RPC ------------------------------------------------------------------------------


def test_vector_prototypes_give_the_seed_index(embed_server):
    n, batch_size, num_instance = 60, 16, 4
    p = batch_size // num_instance
    x = clustered(n)
    counts = np.random.default_rng(3).integers(1, 7, n)
    index = build_epoch(
        embed_server.address, counts, x, batch_size=batch_size, num_instance=num_instance, seed=11
    )
    assert index.positions.size == n * batch_size and index.batch_size == batch_size
    assert index.knn_precision == "fp32" and index.model_name == ""
    ident, ordinal = identities_of(index.positions, counts)
    assert (ordinal >= 0).all() and (ordinal < counts[ident]).all()
    members = ident.reshape(n, p, num_instance)
    assert (members == members[:, :, :1]).all()
    groups = members[:, :, 0]
    assert sorted(groups[:, -1].tolist()) == list(range(n))
    brute, _ = knn_bruteforce(x, p - 1)
    np.testing.assert_array_equal(groups[:, :-1], brute[groups[:, -1]])
    np.testing.assert_array_equal(index.cursors, np.bincount(ident, minlength=n))

    # The server computes exactly the documented plan, and the same request gives the same
    # index; the next epoch continues every identity's stream from the returned cursors.
    plan = plan_epoch(knn(x, p - 1)[0], counts, np.zeros(n, np.uint64), num_instance, 11, 0)
    np.testing.assert_array_equal(index.positions, np.concatenate(list(plan.chunks(7))))
    again = build_epoch(
        embed_server.address, counts, x, batch_size=batch_size, num_instance=num_instance, seed=11
    )
    np.testing.assert_array_equal(again.positions, index.positions)
    other = build_epoch(
        embed_server.address, counts, x, batch_size=batch_size, num_instance=num_instance, seed=12
    )
    assert not np.array_equal(other.positions, index.positions)
    nxt = build_epoch(
        embed_server.address,
        counts,
        x,
        batch_size=batch_size,
        num_instance=num_instance,
        seed=11,
        epoch=1,
        cursors=index.cursors,
    )
    plan1 = plan_epoch(knn(x, p - 1)[0], counts, index.cursors, num_instance, 11, 1)
    np.testing.assert_array_equal(nxt.positions, np.concatenate(list(plan1.chunks(100))))


def test_image_prototypes_are_embedded_by_the_served_model(embed_server):
    n = 12
    images = [crop(i) for i in range(n)]
    with Client(embed_server.address) as client:
        vectors, _ = client.embed(images, alignment="aligned")
    counts = np.full(n, 3)
    index = build_epoch(
        embed_server.address,
        counts,
        [make_image_input(im, alignment="aligned") for im in images],
        batch_size=6,
        num_instance=2,
    )
    assert index.model_name == embed_server.spec.name
    ident, _ = identities_of(index.positions, counts)
    groups = ident.reshape(n, 3, 2)[:, :, 0]
    brute, _ = knn_bruteforce(vectors, 2)
    np.testing.assert_array_equal(groups[:, :-1], brute[groups[:, -1]])


def records(x: np.ndarray, counts, pids=None) -> list[sampling_pb2.IdentityRecord]:
    return [
        sampling_pb2.IdentityRecord(
            pid="" if pids is None else pids[i],
            sample_count=int(c),
            vector=np.asarray(x[i], "<f4").tobytes(),
        )
        for i, c in enumerate(counts)
    ]


def call(address: str, messages: list[sampling_pb2.BuildEpochRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        stub = sampling_pb2_grpc.SamplingStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.BuildEpoch(iter(messages), timeout=60))
    return info.value


def opts(batch_size=8, num_instance=2, **kw) -> sampling_pb2.SamplingOptions:
    return sampling_pb2.SamplingOptions(batch_size=batch_size, num_instance=num_instance, **kw)


X = clustered(6, dim=8)


def bad_vector(i: int, value: bytes) -> list[sampling_pb2.IdentityRecord]:
    recs = records(X, [1] * 6)
    recs[i].vector = value
    return recs


def bad_image(i: int, image: common_pb2.ImageInput) -> list[sampling_pb2.IdentityRecord]:
    recs = records(X, [1] * 6)
    recs[i].image.CopyFrom(image)
    return recs


NAN_VECTOR = np.array([0, 1, np.nan, 3, 4, 5, 6, 7], "<f4").tobytes()

INVALID = [
    (
        [opts(10, 4)],
        "options.batch_size: 10 is not divisible by options.num_instance 4 (a batch is P "
        "identities x num_instance samples)",
    ),
    ([opts(8, 0)], "options.num_instance: must be >= 1, got 0"),
    ([opts(0, 2)], "options.batch_size: must be >= 1, got 0"),
    (
        [opts(16, 4), records(X[:3], [1, 1, 1])],
        "identities: need at least P = batch_size / num_instance = 16 / 4 = 4 identities, got 3",
    ),
    (
        [opts(), records(X, [2, 1, 0, 3, 0, 1], pids=list("abcdef"))],
        "identities[2] (pid 'c').sample_count: is 0; every identity needs >= 1 sample "
        "(2 of 6 identities have none)",
    ),
    ([records(X, [1] * 6)], "options: the first message must set options"),
    ([], "options: empty request stream; send options first"),
    (
        [opts(), records(X[:3], [1] * 3), ("options", opts())],
        "messages[1].options: only the first message may set options",
    ),
    (
        [opts(), [sampling_pb2.IdentityRecord(sample_count=1)]],
        "identities[0]: set a prototype (vector or image)",
    ),
    (
        [opts(), bad_vector(1, b"\0" * 28)],
        "identities[1].vector: need 8 float32 values (32 bytes), got 28 bytes",
    ),
    ([opts(), bad_vector(3, NAN_VECTOR)], "identities[3].vector: values must be finite"),
    (
        [opts(), bad_vector(4, b"\0" * 32)],
        "identities[4].vector: is all zeros (no direction for cosine similarity)",
    ),
    (
        [opts(), bad_image(1, common_pb2.ImageInput(encoded=b"not an image"))],
        "identities[1].image: ",
    ),
    (
        [opts(), bad_image(2, common_pb2.ImageInput(encoded=b"x", landmarks=[1, 2, 3]))],
        "identities[2].image.landmarks: need 10 values, got 3",
    ),
    (
        [
            opts(dim=8),
            bad_image(
                0,
                common_pb2.ImageInput(
                    raw=common_pb2.RawImage(height=112, width=112, data=crop(0).tobytes())
                ),
            ),
        ],
        "options.dim: 8 values, but image prototypes embed into 512",
    ),
]


@pytest.mark.parametrize(("parts", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
def test_invalid_argument(embed_server, parts, message):
    messages = []
    for part in parts:
        if isinstance(part, sampling_pb2.SamplingOptions):
            messages.append(sampling_pb2.BuildEpochRequest(options=part))
        elif isinstance(part, tuple):
            messages.append(sampling_pb2.BuildEpochRequest(options=part[1]))
        elif messages:
            messages[-1].identities.extend(part)
        else:
            messages.append(sampling_pb2.BuildEpochRequest(identities=part))
    error = call(embed_server.address, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in error.details()


def test_undecodable_image_prototype_names_identity_and_reason(embed_server):
    error = call(
        embed_server.address,
        [
            sampling_pb2.BuildEpochRequest(
                options=opts(),
                identities=bad_image(1, common_pb2.ImageInput(encoded=b"not an image")),
            )
        ],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("identities[1].image: ")
    assert "reason UNDECODABLE" in error.details()


@pytest.fixture(scope="module")
def small_server(ir18_repository):
    """One build at a time, at most 20 identities."""
    repository, name = ir18_repository
    settings = server_settings(repository, name, sampling_max_builds=1, sampling_max_identities=20)
    server = ServerThread(settings).start()
    yield server
    server.stop()


def test_too_many_identities(small_server):
    error = call(
        small_server.address,
        [
            sampling_pb2.BuildEpochRequest(
                options=opts(), identities=records(clustered(21), [1] * 21)
            )
        ],
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "identities: at most 20 per request (sampling_max_identities), got more"
    )


def test_busy_builds_are_refused_at_once(small_server):
    # The only build slot, held here as a running build holds it (from complete input
    # until its answer is written).
    with small_server.app.sampling.build_slot():
        error = call(small_server.address, [sampling_pb2.BuildEpochRequest(options=opts())])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "sampling: 1 index builds already running (sampling_max_builds); retry later"
        )
        with pytest.raises(ResourceExhausted):
            build_epoch(small_server.address, [1] * 6, X, batch_size=8, num_instance=2, retries=0)
    # The slot is free again.
    assert build_epoch(
        small_server.address, [1] * 6, X, batch_size=8, num_instance=2
    ).positions.size


def test_client_raises_typed_invalid_argument(embed_server):
    with pytest.raises(InvalidArgument, match=r"options\.batch_size: 10 is not divisible"):
        build_epoch(embed_server.address, [1] * 6, X, batch_size=10, num_instance=4)


# -- GraphSampler ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    """(path, pid, camid, frame) items like the seed's; 10 identities, 1-5 images each."""
    root = tmp_path_factory.mktemp("faces")
    items = []
    rng = np.random.default_rng(0)
    for pid in range(10):
        for k in range(int(rng.integers(1, 6))):
            name = f"{pid:03d}_{k}.png"
            Image.fromarray(crop(100 * pid + k)).save(root / name)
            items.append((name, pid, 0, k))
    rng.shuffle(items)  # dataset order is not grouped by identity
    return root, items


class Faces(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return i, self.items[i][1]


def test_graph_sampler_in_a_dataloader(embed_server, image_dataset):
    root, items = image_dataset
    sampler = GraphSampler(
        items, root, batch_size=8, num_instance=2, server=embed_server.address, seed=5
    )
    loader = torch.utils.data.DataLoader(Faces(items), batch_size=8, sampler=sampler)
    assert len(sampler) == 10 * 8
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 10
        for indices, pids in batches:
            assert len(indices) == 8
            groups = pids.view(4, 2)
            assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 4
            assert all(
                items[i][1] == p for i, p in zip(indices.tolist(), pids.tolist(), strict=True)
            )
        epochs.append(torch.cat([b[0] for b in batches]).tolist())
    assert sampler.epoch == 2 and sampler.last_index.model_name == embed_server.spec.name
    assert epochs[0] != epochs[1]
    # Cursors are per identity in order of first appearance: samples drawn over both epochs.
    drawn = np.bincount([items[i][1] for e in epochs for i in e], minlength=10)
    np.testing.assert_array_equal(sampler.cursors, drawn[sampler.pids])

    # Reproducible: a fresh sampler with the same seed yields the same epochs.
    again = GraphSampler(
        items, root, batch_size=8, num_instance=2, server=embed_server.address, seed=5
    )
    assert [list(again), list(again)] == epochs


def test_graph_sampler_with_training_model_features(embed_server, image_dataset):
    _, items = image_dataset
    table = clustered(len(items), dim=16, seed=4)
    calls = []

    def features(indices):
        calls.append(np.asarray(indices))
        return table[indices]

    sampler = GraphSampler(
        items, batch_size=6, num_instance=3, server=embed_server.address, features=features
    )
    sampler.set_epoch(3)
    order = list(sampler)
    assert len(order) == len(sampler) == 10 * 6
    chosen = calls[0]
    assert [items[i][1] for i in chosen] == sampler.pids, "one prototype per identity"
    np.testing.assert_array_equal(chosen, sampler.prototypes(3))


def test_graph_sampler_argument_checks(embed_server, image_dataset):
    _, items = image_dataset
    with pytest.raises(ValueError, match="batch_size 10 must be a positive multiple"):
        GraphSampler(items, batch_size=10, num_instance=4, server=embed_server.address)
    with pytest.raises(ValueError, match=r"need at least P = .* = 16 identities, got 10"):
        GraphSampler(items, batch_size=64, num_instance=4, server=embed_server.address)
