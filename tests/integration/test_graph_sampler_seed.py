"""GraphSampler as a drop-in for the seed's: same signature, same indices as the seed's own
algorithm given the same random choices, with the training model's features, a matcher, a
real server, both first-pass modes and per-rank splits."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_client import GraphSampler
from adaface_server.sampling.index import shuffled_order

from .seed_graph_sampler import SeedGraphSampler

BATCH, INSTANCES = 8, 2  # P = 4
SEED = 3


class TinyNet(torch.nn.Module):
    """A small real training model; like AdaFace's backbone it returns (embedding, norm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 16)

    def forward(self, x):
        y = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        y = self.fc(y.flatten(1))
        norm = y.norm(dim=1, keepdim=True)
        return y / norm, norm


def transformer(image: Image.Image) -> torch.Tensor:
    small = np.asarray(image.resize((24, 24)), dtype=np.float32)
    return torch.from_numpy(small.transpose(2, 0, 1).copy() / 127.5 - 1.0)


def euclidean(probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return torch.cdist(probe, gallery)


def cosine(probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    p = torch.nn.functional.normalize(probe, dim=1)
    g = torch.nn.functional.normalize(gallery, dim=1)
    return 1.0 - p @ g.T


class QAConvLike:
    """The QAConv matcher protocol: make_kernel(probe), then matcher(gallery) -> [p, g] scores."""

    def make_kernel(self, probe: torch.Tensor) -> None:
        self.kernel = probe

    def __call__(self, gallery: torch.Tensor) -> torch.Tensor:
        return 20.0 * self.kernel @ gallery.T


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(path, pid, camid) items; 23 identities with 1-6 images, dataset order interleaved."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(7)
    centres = rng.integers(0, 256, (6, 3))
    items = []
    for pid in range(23):
        base = centres[pid % 6]
        for k in range(int(rng.integers(1, 7))):
            noise = rng.integers(-60, 60, (24, 24, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            name = f"{pid:03d}_{k}.png"
            Image.fromarray(pixels).save(root / name)
            items.append((name, 1000 + pid, 0))
    rng.shuffle(items)
    return root, items


def seed_for(ours: GraphSampler, dataset, model, matcher, first_pass: str) -> SeedGraphSampler:
    """The seed's algorithm fed our sampler's random choices."""
    root, items = dataset

    def reshuffle(j: int, wrap: int, ordered: list[int]) -> list[int]:
        return [ordered[o] for o in shuffled_order(SEED, j, wrap, len(ordered))]

    return SeedGraphSampler(
        items,
        str(root),
        transformer,
        model,
        matcher,
        BATCH,
        INSTANCES,
        5,
        7,
        choose=lambda epoch: ours.prototypes(epoch).tolist(),
        reshuffle=reshuffle,
        batch_permutation=lambda epoch, n: np.random.default_rng([SEED, epoch]).permutation(n),
        shuffle_at_start=first_pass == "shuffled",
    )


def test_signature_is_the_seeds():
    params = list(inspect.signature(GraphSampler).parameters.values())
    seed = [
        ("data_source", inspect.Parameter.empty),
        ("img_path", None),
        ("transformer", None),
        ("model", None),
        ("matcher", None),
        ("batch_size", 64),
        ("num_instance", 4),
        ("gal_batch_size", 256),
        ("prob_batch_size", 256),
    ]
    assert [(p.name, p.default) for p in params[:9]] == seed
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params[:9])


@pytest.mark.parametrize("first_pass", ["dataset_order", "shuffled"])
@pytest.mark.parametrize("matcher", [euclidean, QAConvLike()], ids=["callable", "qaconv"])
def test_in_process_matcher_gives_the_seeds_indices(dataset, matcher, first_pass, monkeypatch):
    monkeypatch.delenv("ADAFACE_SERVER", raising=False)
    root, items = dataset
    model = TinyNet()
    # Positional, exactly as the seed is called; no server is needed with a model.
    ours = GraphSampler(
        items, str(root), transformer, model, matcher, BATCH, INSTANCES, 5, 7,
        seed=SEED, first_pass=first_pass,
    )  # fmt: skip
    reference = seed_for(ours, dataset, model, matcher, first_pass)
    for _ in range(3):
        model.train()
        got = list(ours)
        assert model.training, "the model's mode is restored (the seed leaves it in eval)"
        assert got == list(reference)
    assert len(ours) == 23 * BATCH


@pytest.mark.parametrize("first_pass", ["dataset_order", "shuffled"])
def test_model_features_through_the_server_give_the_seeds_indices(
    embed_server, dataset, first_pass
):
    root, items = dataset
    model = TinyNet()
    ours = GraphSampler(
        data_source=items,
        img_path=root,
        transformer=transformer,
        model=model,
        matcher=None,
        batch_size=BATCH,
        num_instance=INSTANCES,
        gal_batch_size=4,
        prob_batch_size=4,
        server=embed_server.address,
        seed=SEED,
        first_pass=first_pass,
    )
    reference = seed_for(ours, dataset, model, cosine, first_pass)
    for _ in range(3):
        assert list(ours) == list(reference)
        assert ours.last_index is not None and ours.last_index.model_name == ""


def test_first_pass_reads_dataset_order(dataset, monkeypatch):
    """Independent of the seed copy: undo the documented batch order, then every identity's
    draws, in group order, start with its samples in dataset order."""
    monkeypatch.delenv("ADAFACE_SERVER", raising=False)
    _, items = dataset
    feats = torch.from_numpy(np.random.default_rng(0).standard_normal((len(items), 8)))
    sampler = GraphSampler(
        items, batch_size=BATCH, num_instance=INSTANCES, seed=SEED,
        features=lambda idx: feats[idx], first_pass="dataset_order",
    )  # fmt: skip
    batches = np.asarray(list(sampler)).reshape(-1, BATCH)
    groups = np.empty_like(batches)
    groups[np.random.default_rng([SEED, 0]).permutation(len(batches))] = batches
    by_pid: dict[int, list[int]] = {}
    for i, (_, pid, _) in enumerate(items):
        by_pid.setdefault(pid, []).append(i)
    drawn: dict[int, list[int]] = {}
    for i in groups.reshape(-1).tolist():
        drawn.setdefault(items[i][1], []).append(i)
    assert set(drawn) == set(by_pid)
    for pid, samples in by_pid.items():
        first = drawn[pid][: len(samples)]
        assert first == samples[: len(first)], pid
