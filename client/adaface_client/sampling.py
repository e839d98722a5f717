"""Training samplers: GraphSampler (the seed's graph sampling, served) and RandomIdentitySampler.

Both are ``torch.utils.data.Sampler``s, so this module imports torch; ``import adaface_client``
loads it only when one of them is first used.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch.utils.data

from adaface.v1 import common_pb2, sampling_pb2, sampling_pb2_grpc
from adaface_client.client import (
    _CHANNEL_OPTIONS,
    _RETRYABLE,
    AlignmentLike,
    Internal,
    _backoff_delay,
    from_rpc_error,
    make_image_input,
)
from adaface_client.epoch_plan import plan_epoch
from adaface_client.prototypes import matcher_knn, model_features
from adaface_client.transport import open_channel

__all__ = [
    "EpochIndex",
    "GraphSampler",
    "RandomIdentitySampler",
    "build_epoch",
    "distributed_rank",
    "resolve_server",
]

# Request messages stay small next to the server's 64 MiB limit, so sending pipelines well.
_MESSAGE_BYTES = 4 * 1024 * 1024
_MESSAGE_RECORDS = 4096


@dataclass(frozen=True)
class EpochIndex:
    """One epoch from Sampling.BuildEpoch.

    `positions` [length] int64: index into the concatenation of every identity's samples in
    request order (identity j's ordinal k is offsets[j] + k); every `batch_size` consecutive
    entries form one batch. `cursors` [N] uint64: pass them to the next epoch.
    """

    positions: np.ndarray
    cursors: np.ndarray
    batch_size: int
    num_instance: int
    num_samples: int
    knn_precision: str
    model_name: str


def build_epoch(
    target: str,
    counts: Sequence[int] | np.ndarray,
    prototypes: np.ndarray | Sequence[Any],
    *,
    batch_size: int,
    num_instance: int,
    seed: int = 0,
    epoch: int = 0,
    cursors: np.ndarray | None = None,
    pids: Sequence[Any] | None = None,
    flip: bool = False,
    first_pass_in_order: bool = False,
    timeout: float = 600.0,
    retries: int = 4,
    backoff: float = 0.5,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> EpochIndex:
    """Calls Sampling.BuildEpoch once (retrying UNAVAILABLE / RESOURCE_EXHAUSTED).

    `prototypes` is either an [N, D] float array (one vector per identity) or a sequence of
    N ImageInput messages or zero-argument callables returning one (read lazily as the
    request streams). `first_pass_in_order`: each identity's stream starts with its samples
    in order before the first reshuffle. `credentials` (e.g. tls_credentials(...)) and
    `token` (a bearer token) as for Client. Raises a typed adaface_client.AdafaceError on failure.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.size
    cursors = np.zeros(n, np.uint64) if cursors is None else np.asarray(cursors, np.uint64)
    if cursors.shape != (n,) or len(prototypes) != n:
        raise ValueError(
            f"counts, cursors and prototypes must have one entry per identity ({n}), got "
            f"{cursors.shape[0]} cursors and {len(prototypes)} prototypes"
        )
    options = sampling_pb2.SamplingOptions(
        batch_size=batch_size,
        num_instance=num_instance,
        seed=seed,
        epoch=epoch,
        flip_fusion=flip,
        first_pass_in_order=first_pass_in_order,
    )
    vectors = None
    if isinstance(prototypes, np.ndarray):
        vectors = np.ascontiguousarray(prototypes, dtype="<f4")
        options.dim = vectors.shape[1]

    def requests() -> Iterator[sampling_pb2.BuildEpochRequest]:
        message = sampling_pb2.BuildEpochRequest(options=options)
        size = 0
        for j in range(n):
            record = message.identities.add(
                pid="" if pids is None else str(pids[j]),
                sample_count=int(counts[j]),
                cursor=int(cursors[j]),
            )
            if vectors is not None:
                record.vector = vectors[j].tobytes()
            else:
                proto = prototypes[j]
                record.image.CopyFrom(proto() if callable(proto) else proto)
            size += record.ByteSize()
            if size >= _MESSAGE_BYTES or len(message.identities) >= _MESSAGE_RECORDS:
                yield message
                message, size = sampling_pb2.BuildEpochRequest(), 0
        if message.identities or message.HasField("options"):
            yield message

    for attempt in itertools.count():
        channel = open_channel(target, credentials, token, _CHANNEL_OPTIONS)
        try:
            with channel:
                stub = sampling_pb2_grpc.SamplingStub(channel)
                return _read_epoch(stub.BuildEpoch(requests(), timeout=timeout), n)
        except grpc.RpcError as e:
            if e.code() in _RETRYABLE and attempt < retries:
                time.sleep(_backoff_delay(backoff, attempt))
                continue
            raise from_rpc_error(e) from None
    raise AssertionError("unreachable")


def _read_epoch(responses: Iterator[sampling_pb2.BuildEpochResponse], n: int) -> EpochIndex:
    header = None
    positions: np.ndarray | None = None
    cursors = bytearray()
    filled = 0
    for response in responses:
        part = response.WhichOneof("part")
        if part == "header":
            header = response.header
            positions = np.empty(header.length, dtype=np.int64)
        elif header is None or positions is None:
            raise Internal(grpc.StatusCode.INTERNAL, "BuildEpoch: data before the header")
        elif part == "positions":
            chunk = np.frombuffer(response.positions, dtype=f"<u{header.position_bytes}")
            positions[filled : filled + chunk.size] = chunk
            filled += chunk.size
        elif part == "cursors":
            cursors += response.cursors
    if header is None or positions is None or filled != header.length or len(cursors) != 8 * n:
        raise Internal(
            grpc.StatusCode.INTERNAL,
            f"BuildEpoch: incomplete reply ({filled} of "
            f"{header.length if header else '?'} positions, {len(cursors) // 8} of {n} cursors)",
        )
    return EpochIndex(
        positions=positions,
        cursors=np.frombuffer(bytes(cursors), dtype="<u8").astype(np.uint64),
        batch_size=header.batch_size,
        num_instance=header.num_instance,
        num_samples=header.num_samples,
        knn_precision=header.knn_precision,
        model_name=header.model_name,
    )


def _identities(data_source: Sequence[Any]) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """(pids in order of first appearance, samples per pid, dataset indices grouped by pid)."""
    pids: dict[Any, list[int]] = {}
    for index, item in enumerate(data_source):
        pids.setdefault(item[1], []).append(index)
    counts = np.array([len(v) for v in pids.values()], dtype=np.int64)
    samples = np.fromiter(itertools.chain.from_iterable(pids.values()), np.int64, int(counts.sum()))
    return list(pids), counts, samples


class GraphSampler(torch.utils.data.Sampler[int]):
    """Drop-in for the seed's (QAConv / AdaFace) ``GraphSampler``.

    ``GraphSampler(data_source, img_path, transformer, model, matcher, batch_size=64,
    num_instance=4, gal_batch_size=256, prob_batch_size=256)``, positionally or by keyword.
    Each epoch one random sample per identity is its prototype; every identity and its P-1
    nearest identities (P = batch_size / num_instance) form one batch of num_instance
    samples each, read by a per-identity circular pointer that reshuffles on every wrap and
    survives epochs; the N batches are shuffled. Iterating yields dataset indices; use it
    with ``DataLoader(dataset, batch_size=batch_size, sampler=sampler)``.

    `data_source`: items ``(path, pid, ...)``; images are ``os.path.join(img_path, path)``.
    Prototype features, first that applies:

    - `model` given: the images are embedded by that model exactly as the seed does
      (`transformer` on each PIL RGB image, batches of `gal_batch_size`, the model's own
      device, eval mode, no grad; the mode is restored afterwards), so the graph follows
      the model being trained;
    - `features` given: ``features(dataset_indices) -> [N, D]`` array or tensor;
    - otherwise the served model embeds the images (needs a server).

    Graph: with a `matcher` (``matcher(probe, gallery) -> [p, g]`` distances, smaller is
    closer, or a QAConv matcher with ``make_kernel``) the neighbours are ranked in-process
    in `prob_batch_size` x `gal_batch_size` tiles, never N x N. Without one the distance is
    cosine on the normalised features, computed by the server's Sampling.BuildEpoch when a
    server is set (its tiled kNN scales to millions of identities), else in-process.

    `server`: ``host:port`` of an adaface server, or the ``ADAFACE_SERVER`` environment
    variable; needed only for served-model prototypes or to compute the kNN remotely.

    `first_pass`: ``"shuffled"`` (default: each identity's first pass is already in random
    order, as QAConv's sampler which shuffles its lists at start) or ``"dataset_order"``
    (the first pass reads each identity's samples in dataset order, as AdaFace's seed does;
    later passes are shuffled in both modes).

    ``len(sampler)`` is the number of indices one epoch yields on this rank:
    ``(N // world_size) * batch_size`` for N identities (``N * batch_size`` on one
    process). The seed returns N before its first epoch and N * batch_size after; here it
    is the epoch length from the start, which is what DataLoader needs.

    DDP: `rank` / `world_size` (default ``RANK`` / ``WORLD_SIZE``, else 0 / 1). Every rank
    builds the same epoch (same seed and epoch; give every rank the same features, as DDP
    replicas are) and takes whole batches ``rank, rank + world_size, ...``: disjoint
    batches, the same number on every rank; the N mod world_size batches left over are
    dropped for that epoch (a different set each epoch, as the batch order is shuffled).

    Randomness is explicit: prototypes come from ``np.random.default_rng([seed, epoch,
    1])``, the batch order from ``np.random.default_rng([seed, epoch])`` and each wrap's
    reshuffle from a keyed permutation of (seed, identity, wrap). ``set_epoch(e)`` picks
    the epoch (as DistributedSampler); otherwise each iteration advances it.
    `alignment` (served-model prototypes) defaults to "aligned": training sets are aligned
    112x112 crops (pass "detect" for photos). `credentials` and `token` as for Client.
    """

    def __init__(
        self,
        data_source: Sequence[Any],
        img_path: str | os.PathLike | None = None,
        transformer: Callable[[Any], Any] | None = None,
        model: torch.nn.Module | None = None,
        matcher: Callable[..., Any] | None = None,
        batch_size: int = 64,
        num_instance: int = 4,
        gal_batch_size: int = 256,
        prob_batch_size: int = 256,
        *,
        server: str | None = None,
        features: Callable[[np.ndarray], np.ndarray] | None = None,
        first_pass: str = "shuffled",
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        flip: bool = False,
        alignment: AlignmentLike = "aligned",
        timeout: float = 600.0,
        retries: int = 4,
        credentials: grpc.ChannelCredentials | None = None,
        verbose: bool = False,
        token: str | None = None,
    ) -> None:
        super().__init__()
        if num_instance < 1 or batch_size < 1 or batch_size % num_instance:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of num_instance "
                f"{num_instance} (a batch is P identities x num_instance samples)"
            )
        for name, value in (
            ("gal_batch_size", gal_batch_size),
            ("prob_batch_size", prob_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if first_pass not in FIRST_PASSES:
            raise ValueError(f"first_pass must be one of {FIRST_PASSES}, got {first_pass!r}")
        if model is not None and not callable(model):
            raise TypeError(f"model must be a torch module (callable), got {type(model).__name__}")
        if matcher is not None and not callable(matcher):
            raise TypeError(f"matcher must be callable, got {type(matcher).__name__}")
        self.data_source = data_source
        self.img_path = img_path
        self.transformer = transformer
        self.model = model
        self.matcher = matcher
        self.batch_size = batch_size
        self.num_instance = num_instance
        self.gal_batch_size = gal_batch_size
        self.prob_batch_size = prob_batch_size
        self.features = features
        self.first_pass = first_pass
        self.seed = seed
        self.flip = flip
        self.alignment = alignment
        self.timeout = timeout
        self.retries = retries
        self.credentials = credentials
        self.token = token
        self.verbose = verbose
        self.rank, self.world_size = distributed_rank(rank, world_size)
        self.target = resolve_server(server)
        if (
            img_path is not None
            and _HOST_PORT.match(os.fspath(img_path))
            and not os.path.isdir(img_path)
        ):
            # The call shape of earlier versions (address second) must not pass silently.
            raise ValueError(
                f"img_path: {os.fspath(img_path)!r} looks like a server address, not a "
                "folder; the second positional argument is img_path, as in the seed: pass "
                "the server as server='host:port' (or ADAFACE_SERVER)"
            )
        if self.target is None and model is None and features is None:
            raise ValueError(
                "server: prototypes embedded by the served model need a server; pass "
                "server='host:port' or set ADAFACE_SERVER, or give model= or features="
            )
        self.pids, self.counts, self._samples = _identities(data_source)
        self.num_pids = len(self.pids)
        p = batch_size // num_instance
        if self.num_pids < p:
            raise ValueError(
                f"need at least P = batch_size / num_instance = {batch_size} / {num_instance} "
                f"= {p} identities, got {self.num_pids}"
            )
        if self.num_pids < self.world_size:
            raise ValueError(
                f"world_size {self.world_size} is more than the {self.num_pids} batches of an "
                "epoch: some rank would get none"
            )
        self._offsets = np.cumsum(self.counts) - self.counts
        self.cursors = np.zeros(self.num_pids, np.uint64)
        self.epoch = 0
        self.last_index: EpochIndex | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_pids // self.world_size) * self.batch_size

    def prototypes(self, epoch: int) -> np.ndarray:
        """Dataset indices of this epoch's prototypes, one per identity (in pid order)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        return self._samples[self._offsets + rng.integers(0, self.counts)]

    def prototype_features(self, chosen: np.ndarray) -> torch.Tensor | None:
        """Features of the chosen samples from `model` or `features`; None: the server's."""
        if self.model is not None:
            paths = [self._path(int(i)) for i in chosen]
            return model_features(self.model, paths, self.transformer, self.gal_batch_size)
        if self.features is not None:
            vectors = self.features(chosen)
            return vectors if isinstance(vectors, torch.Tensor) else torch.as_tensor(vectors)
        return None

    def make_index(self) -> np.ndarray:
        """Builds this epoch's whole index (dataset indices, every rank's batches) and
        advances the epoch. Iterating yields this rank's share of it."""
        start = time.monotonic()
        chosen = self.prototypes(self.epoch)
        feats = self.prototype_features(chosen)
        if self.target is None or self.matcher is not None:
            assert feats is not None
            positions, self.cursors = self._local_index(feats)
            self.last_index = None
        else:
            if feats is not None:
                prototypes: np.ndarray | list[Any] = feats.detach().float().flatten(1).cpu().numpy()
            else:
                prototypes = [self._image(int(i)) for i in chosen]
            index = build_epoch(
                self.target,
                self.counts,
                prototypes,
                batch_size=self.batch_size,
                num_instance=self.num_instance,
                seed=self.seed,
                epoch=self.epoch,
                cursors=self.cursors,
                pids=self.pids,
                flip=self.flip,
                first_pass_in_order=self.first_pass == "dataset_order",
                timeout=self.timeout,
                retries=self.retries,
                credentials=self.credentials,
                token=self.token,
            )
            positions, self.cursors = index.positions, index.cursors
            self.last_index = index
        if self.verbose:
            print(f"GraphSampler: epoch {self.epoch} index in {time.monotonic() - start:.3f}s")
        self.epoch += 1
        return self._samples[positions]

    def _local_index(self, feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        neighbours = matcher_knn(
            feats,
            self.batch_size // self.num_instance - 1,
            self.matcher,
            self.prob_batch_size,
            self.gal_batch_size,
        )
        plan = plan_epoch(
            neighbours,
            self.counts,
            self.cursors,
            self.num_instance,
            self.seed,
            self.epoch,
            first_pass_in_order=self.first_pass == "dataset_order",
        )
        return np.concatenate(list(plan.chunks(4096))), plan.cursors

    def rank_batches(self, index: np.ndarray) -> np.ndarray:
        """This rank's whole batches of an epoch index: batches rank, rank + world_size, ..."""
        batches = index.reshape(-1, self.batch_size)
        per_rank = batches.shape[0] // self.world_size
        return batches[self.rank : per_rank * self.world_size : self.world_size].reshape(-1)

    def _path(self, index: int) -> str:
        path = self.data_source[index][0]
        return os.path.join(self.img_path, path) if self.img_path is not None else path

    def _image(self, index: int) -> Callable[[], common_pb2.ImageInput]:
        path = self._path(index)
        return lambda: make_image_input(path, alignment=self.alignment)

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_batches(self.make_index()).tolist())


FIRST_PASSES = ("shuffled", "dataset_order")
# host:port with a DNS name, an IPv4 address or a bracketed IPv6 address.
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


def resolve_server(server: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """`server` or ``ADAFACE_SERVER``, checked to be ``host:port``; None when neither is set.

    Raises ValueError naming the argument (or the variable) and the value otherwise.
    """
    env = os.environ if env is None else env
    name, value = "server", server
    if value is None:
        name, value = "ADAFACE_SERVER", env.get("ADAFACE_SERVER") or None
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected 'host:port' (e.g. 'localhost:50051'), got {value!r}")
    match = _HOST_PORT.match(value)
    if match is None or not 1 <= int(match.group(3)) <= 65535:
        raise ValueError(f"{name}: expected 'host:port' (e.g. 'localhost:50051'), got {value!r}")
    return value


def distributed_rank(
    rank: int | None, world_size: int | None, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else ``RANK`` / ``WORLD_SIZE``, else (0, 1)."""
    env = os.environ if env is None else env
    try:
        if rank is None:
            rank = int(env.get("RANK", "0"))
        if world_size is None:
            world_size = int(env.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(f"RANK / WORLD_SIZE must be integers: {e}") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


class RandomIdentitySampler(torch.utils.data.Sampler[int]):
    """The seed's baseline (QAConv ``RandomIdentitySampler``): identities in random order,
    `num_instances` samples each (without replacement when the identity has enough).

    Seeded: epoch e uses ``np.random.default_rng([seed, e])`` instead of the global torch and
    numpy generators; ``set_epoch`` picks e, otherwise each iteration advances it.
    """

    def __init__(self, data_source: Sequence[Any], num_instances: int = 1, *, seed: int = 0):
        super().__init__()
        if num_instances < 1:
            raise ValueError(f"num_instances must be >= 1, got {num_instances}")
        self.data_source = data_source
        self.num_instances = num_instances
        self.seed = seed
        self.epoch = 0
        self.pids, self.counts, samples = _identities(data_source)
        offsets = np.cumsum(self.counts) - self.counts
        self.index_dic = {
            pid: samples[o : o + c]
            for pid, o, c in zip(self.pids, offsets, self.counts, strict=True)
        }
        self.num_samples = len(self.pids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples * self.num_instances

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        ret: list[int] = []
        for i in rng.permutation(self.num_samples):
            t = self.index_dic[self.pids[i]]
            replace = len(t) < self.num_instances
            ret.extend(rng.choice(t, size=self.num_instances, replace=replace).tolist())
        return iter(ret)
