"""RandomIdentitySampler (the seed's baseline) and the lazy loading of the torch samplers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from adaface_client.sampling import RandomIdentitySampler

# (path, pid, camid) items like the seed's; identity 2 has fewer samples than num_instances.
DATA = [(f"{pid}_{k}.jpg", pid, 0) for pid, n in [(7, 5), (3, 4), (2, 1), (9, 6)] for k in range(n)]


def test_every_identity_once_with_num_instances_samples():
    sampler = RandomIdentitySampler(DATA, num_instances=4, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 4 * 4
    blocks = [order[i : i + 4] for i in range(0, 16, 4)]
    pids = [DATA[b[0]][1] for b in blocks]
    assert sorted(pids) == [2, 3, 7, 9]
    for block, pid in zip(blocks, pids, strict=True):
        assert all(DATA[i][1] == pid for i in block)
        if pid != 2:
            assert len(set(block)) == 4, "without replacement when there are enough"
    assert Counter(order)[DATA.index(("2_0.jpg", 2, 0))] == 4, "with replacement otherwise"


def test_seeded_per_epoch():
    a = RandomIdentitySampler(DATA, num_instances=2, seed=5)
    b = RandomIdentitySampler(DATA, num_instances=2, seed=5)
    epochs_a = [list(a) for _ in range(3)]
    assert epochs_a == [list(b) for _ in range(3)]
    assert len({tuple(e) for e in epochs_a}) > 1, "each epoch draws anew"
    b.set_epoch(1)
    assert list(b) == epochs_a[1]
    with pytest.raises(ValueError, match="num_instances must be >= 1"):
        RandomIdentitySampler(DATA, num_instances=0)


def test_samplers_load_torch_only_when_used():
    code = textwrap.dedent(
        """
        import sys
        import adaface_client
        assert "torch" not in sys.modules, "import adaface_client imported torch"
        assert adaface_client.Extractor is not None
        assert "torch" not in sys.modules, "the Extractor imported torch"
        from adaface_client import GraphSampler
        import torch.utils.data
        assert issubclass(GraphSampler, torch.utils.data.Sampler)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
