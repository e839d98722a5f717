"""Training samplers: GraphSampler (the seed's graph sampling, served) and RandomIdentitySampler.

Both are ``torch.utils.data.Sampler``s, so this module imports torch; ``import adaface_client``
loads it only when one of them is first used.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
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
from adaface_client.transport import open_channel

__all__ = ["EpochIndex", "GraphSampler", "RandomIdentitySampler", "build_epoch"]

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
    timeout: float = 600.0,
    retries: int = 4,
    backoff: float = 0.5,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> EpochIndex:
    """Calls Sampling.BuildEpoch once (retrying UNAVAILABLE / RESOURCE_EXHAUSTED).

    `prototypes` is either an [N, D] float array (one vector per identity) or a sequence of
    N ImageInput messages or zero-argument callables returning one (read lazily as the
    request streams). `credentials` (e.g. tls_credentials(...)) and `token` (a bearer
    token) as for Client. Raises a typed adaface_client.AdafaceError on failure.
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
        batch_size=batch_size, num_instance=num_instance, seed=seed, epoch=epoch, flip_fusion=flip
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
    """Drop-in for the seed's (QAConv) ``GraphSampler``: each epoch, one random sample per
    identity is its prototype; the Sampling service links every identity to its P-1 nearest
    (P = batch_size / num_instance) and returns batches of P identities x num_instance
    samples, in shuffled batch order. Iterating yields dataset indices; use it with
    ``DataLoader(dataset, batch_size=batch_size, sampler=sampler)``.

    `data_source`: items ``(path, pid, ...)`` (the seed's layout). Prototypes are the images
    at ``os.path.join(img_path, path)`` embedded by the served model, or, when `features` is
    given, ``features(dataset_indices) -> [N, D]`` array or tensor (e.g. from the model being
    trained, as in the seed). Each identity's samples are read by a circular pointer that
    survives epochs. `alignment` defaults to "aligned": training sets are aligned 112x112
    crops (pass "detect" for photos). `credentials` and `token` as for Client.

    Randomness is explicit: prototypes come from ``np.random.default_rng([seed, epoch, 1])``
    and the server's shuffles from (seed, epoch); ``set_epoch(e)`` picks the epoch (as
    DistributedSampler), otherwise each iteration advances it. The same seed gives the same
    sequence of epochs.
    """

    def __init__(
        self,
        data_source: Sequence[Any],
        target: str,
        batch_size: int = 64,
        num_instance: int = 4,
        *,
        img_path: str | os.PathLike | None = None,
        features: Callable[[np.ndarray], np.ndarray] | None = None,
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
        self.data_source = data_source
        self.target = target
        self.batch_size = batch_size
        self.num_instance = num_instance
        self.img_path = img_path
        self.features = features
        self.seed = seed
        self.flip = flip
        self.alignment = alignment
        self.timeout = timeout
        self.retries = retries
        self.credentials = credentials
        self.token = token
        self.verbose = verbose
        self.pids, self.counts, self._samples = _identities(data_source)
        self.num_pids = len(self.pids)
        p = batch_size // num_instance
        if self.num_pids < p:
            raise ValueError(
                f"need at least P = batch_size / num_instance = {batch_size} / {num_instance} "
                f"= {p} identities, got {self.num_pids}"
            )
        self._offsets = np.cumsum(self.counts) - self.counts
        self.cursors = np.zeros(self.num_pids, np.uint64)
        self.epoch = 0
        self.last_index: EpochIndex | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_pids * self.batch_size

    def prototypes(self, epoch: int) -> np.ndarray:
        """Dataset indices of this epoch's prototypes, one per identity (in pid order)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        return self._samples[self._offsets + rng.integers(0, self.counts)]

    def make_index(self) -> np.ndarray:
        """Builds this epoch's index (dataset indices) and advances the epoch."""
        start = time.monotonic()
        chosen = self.prototypes(self.epoch)
        if self.features is not None:
            vectors = self.features(chosen)
            if hasattr(vectors, "detach"):  # a torch tensor, possibly on a GPU
                vectors = vectors.detach().float().cpu().numpy()
            prototypes: np.ndarray | list[Any] = np.asarray(vectors, np.float32)
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
            timeout=self.timeout,
            retries=self.retries,
            credentials=self.credentials,
            token=self.token,
        )
        self.cursors = index.cursors
        self.last_index = index
        if self.verbose:
            print(f"GraphSampler: epoch {self.epoch} index in {time.monotonic() - start:.3f}s")
        self.epoch += 1
        return self._samples[index.positions]

    def _image(self, index: int) -> Callable[[], common_pb2.ImageInput]:
        path = self.data_source[index][0]
        if self.img_path is not None:
            path = os.path.join(self.img_path, path)
        return lambda: make_image_input(path, alignment=self.alignment)

    def __iter__(self) -> Iterator[int]:
        return iter(self.make_index().tolist())


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
