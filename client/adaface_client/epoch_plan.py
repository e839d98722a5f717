"""One epoch of graph sampling: identity groups from the kNN graph -> circular draws -> batches.

Semantics of the seed's ``GraphSampler.make_index`` (QAConv, Liao & Shao 2021), reproduced:

- P = batch_size / num_instance identities per batch. Identity i forms one group: its P-1
  nearest identities, nearest first, then i itself; each contributes num_instance samples,
  so every group is exactly one batch and an epoch has N batches (N*batch_size entries);
  no identity is left over or dropped.
- Each identity draws its samples from its own stream: a shuffled order of its samples read
  with a circular pointer; when the pointer wraps, the order is reshuffled and reading goes
  on from the start (one draw may span a wrap). Pointers carry over between epochs.
- The N batches are shuffled as whole batches.

Where the seed uses the global ``random``/``np.random`` state, this module is a pure function
of its inputs: the batch order comes from ``np.random.default_rng([seed, epoch])``, and the
c-th shuffled order of identity j is a keyed pseudorandom permutation of its samples (a
Feistel network over splitmix64, keyed by (seed, j, c)). With ``first_pass_in_order`` the
0-th order is the identity's samples as given (the seed reads its dataset-ordered lists
before the first wrap); later orders are shuffled as before. A keyed permutation instead of a
sequential generator lets a stateless server resume every identity's stream from a cursor
(samples drawn so far) and compute any draw directly, vectorised over millions of identities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Distinct keys per Feistel round (computed on Python ints: numpy scalars warn on overflow).
_ROUND_KEYS = tuple(np.uint64((r * 0x9E3779B97F4A7C15) & (2**64 - 1)) for r in range(4))


@dataclass(frozen=True)
class EpochPlan:
    """Everything needed to emit one epoch's index, chunk by chunk, in final order."""

    groups: np.ndarray  # [N, P] int64: identity positions of each group, neighbours first
    first_draw: np.ndarray  # [N, P] uint64: stream position of each group member's 1st sample
    batch_order: np.ndarray  # [N] int64: group emitted as batch b
    counts: np.ndarray  # [N] int64 samples per identity
    offsets: np.ndarray  # [N] int64: position of identity j's first sample in the sample table
    cursors: np.ndarray  # [N] uint64: stream positions after this epoch
    num_instance: int
    seed: int
    first_pass_in_order: bool = False

    @property
    def batch_size(self) -> int:
        return self.groups.shape[1] * self.num_instance

    @property
    def num_batches(self) -> int:
        return self.groups.shape[0]

    @property
    def length(self) -> int:
        return self.num_batches * self.batch_size

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def chunks(self, batches_per_chunk: int) -> Iterator[np.ndarray]:
        """The epoch's sample positions (int64), `batches_per_chunk` batches at a time."""
        for start in range(0, self.num_batches, batches_per_chunk):
            yield self.batches(self.batch_order[start : start + batches_per_chunk])

    def batches(self, group_ids: np.ndarray) -> np.ndarray:
        """Sample positions of the given groups' batches, concatenated: [len * batch_size]."""
        idents = self.groups[group_ids].reshape(-1)
        starts = self.first_draw[group_ids].reshape(-1)
        steps = np.arange(self.num_instance, dtype=np.uint64)
        draws = (starts[:, None] + steps).reshape(-1)
        owners = np.repeat(idents, self.num_instance)
        return self.offsets[owners] + stream_samples(
            owners, draws, self.counts, self.seed, first_pass_in_order=self.first_pass_in_order
        )


def plan_epoch(
    neighbours: np.ndarray,
    counts: np.ndarray,
    cursors: np.ndarray,
    num_instance: int,
    seed: int,
    epoch: int,
    *,
    first_pass_in_order: bool = False,
) -> EpochPlan:
    """Lays out one epoch from the kNN graph.

    `neighbours` [N, P-1]: each identity's nearest other identities, nearest first;
    `counts` [N] samples per identity (>= 1); `cursors` [N] samples each identity's stream
    has yielded in earlier epochs (0 at the start of training); `first_pass_in_order`: each
    stream's first `count` draws are the samples in order (see stream_samples).
    """
    n = neighbours.shape[0]
    counts = np.asarray(counts, dtype=np.int64)
    cursors = np.asarray(cursors, dtype=np.uint64)
    if counts.shape != (n,) or cursors.shape != (n,):
        raise ValueError(f"counts and cursors must be [{n}], got {counts.shape}, {cursors.shape}")
    if n and counts.min() < 1:
        raise ValueError("every identity needs at least one sample")
    groups = np.concatenate([neighbours.astype(np.int64), np.arange(n)[:, None]], axis=1)
    flat = groups.reshape(-1)
    # The k-th time identity j is drawn (in group order, as the seed's loop meets it) it
    # reads stream positions cursor_j + k*num_instance ... + num_instance - 1.
    order = np.argsort(flat, kind="stable")
    times_drawn = np.bincount(flat, minlength=n)
    group_start = np.cumsum(times_drawn) - times_drawn
    rank = np.empty_like(flat)
    rank[order] = np.arange(flat.size) - np.repeat(group_start, times_drawn)
    first_draw = cursors[flat] + rank.astype(np.uint64) * np.uint64(num_instance)
    rng = np.random.default_rng([seed, epoch])
    offsets = np.cumsum(counts) - counts
    return EpochPlan(
        groups=groups,
        first_draw=first_draw.reshape(groups.shape),
        batch_order=rng.permutation(n),
        counts=counts,
        offsets=offsets,
        cursors=cursors + times_drawn.astype(np.uint64) * np.uint64(num_instance),
        num_instance=num_instance,
        seed=seed,
        first_pass_in_order=first_pass_in_order,
    )


def stream_samples(
    owners: np.ndarray,
    draws: np.ndarray,
    counts: np.ndarray,
    seed: int,
    *,
    first_pass_in_order: bool = False,
) -> np.ndarray:
    """Sample ordinal (0..count-1) at stream position `draws[i]` of identity `owners[i]`.

    Identity j's stream is perm(j, 0) ++ perm(j, 1) ++ ..., perm(j, c) being its c-th
    shuffled order: a circular pointer that reshuffles on every wrap. Each draw costs O(1),
    whatever the identity's size: no permutation is ever materialised. With
    `first_pass_in_order`, perm(j, 0) is the identity (samples 0, 1, ..., count-1).
    """
    owners = np.asarray(owners, dtype=np.int64)
    draws = np.asarray(draws, dtype=np.uint64)
    n_j = counts[owners].astype(np.uint64)
    cycle, x = draws // n_j, draws % n_j
    out = _permute(seed, owners, cycle, x, n_j)
    if first_pass_in_order:
        first = cycle == 0
        out[first] = x[first].astype(np.int64)
    return out


def shuffled_order(seed: int, identity: int, cycle: int, count: int) -> np.ndarray:
    """Identity `identity`'s `cycle`-th shuffled order of its `count` samples (its stream's
    positions cycle*count .. cycle*count + count - 1)."""
    size = np.full(count, count, dtype=np.uint64)
    owner = np.full(count, identity, dtype=np.int64)
    cycles = np.full(count, cycle, dtype=np.uint64)
    return _permute(seed, owner, cycles, np.arange(count, dtype=np.uint64), size)


def _permute(
    seed: int, owner: np.ndarray, cycle: np.ndarray, x: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """x -> perm_(seed, owner, cycle)(x) on 0..n-1: a keyed pseudorandom permutation.

    A balanced 4-round Feistel network (Luby-Rackoff: 4 rounds of a pseudorandom function
    give a strong pseudorandom permutation) over the smallest 2^(2h) >= n, with splitmix64
    rounds keyed by (seed, owner, cycle); values landing outside 0..n-1 are encrypted again
    ("cycle walking"), which keeps it a bijection of 0..n-1.
    """
    key = _splitmix(np.full(owner.shape, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    key = _splitmix(key ^ owner.astype(np.uint64))
    key = _splitmix(key ^ cycle.astype(np.uint64))
    bits = np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))).astype(np.uint64)
    half = (bits + np.uint64(1)) // np.uint64(2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    y = x.astype(np.uint64)
    todo = np.arange(y.size)
    while True:
        y[todo] = _feistel(y[todo], key[todo], half[todo], mask[todo])
        todo = todo[y[todo] >= n[todo]]
        if not todo.size:
            return y.astype(np.int64)


def _feistel(x: np.ndarray, key: np.ndarray, half: np.ndarray, mask: np.ndarray) -> np.ndarray:
    left, right = x >> half, x & mask
    for round_key in _ROUND_KEYS:
        f = _splitmix(key ^ (right + round_key)) & mask
        left, right = right, left ^ f
    return (left << half) | right


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))
