"""Prototype features from the model being trained, and the kNN graph a matcher defines.

What the seed's GraphSampler does in-process: embed one image per identity with the training
model (batches of `gal_batch_size`, on the model's own device, no grad) and rank identities
by a matcher's pairwise distances. The ranking here keeps only each row's running top-k, so
no N x N matrix is built (the seed builds the whole matrix; the neighbours are the same).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Matcher = Callable[..., Any]


def default_transform(image: Any) -> torch.Tensor:
    """A PIL RGB image -> AdaFace's model input: [3,H,W] float32, BGR, (x/255 - 0.5) / 0.5."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1))
    return torch.from_numpy((bgr / 255.0 - 0.5) / 0.5)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_features(
    model: torch.nn.Module,
    paths: Sequence[str | os.PathLike],
    transform: Callable[[Any], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Embeds the images at `paths` with `model`, as the seed's ``extract_features``.

    Images are opened with PIL, converted to RGB and passed through `transform` (the seed's
    `transformer`; AdaFace's preprocessing when None), then run through the model in eval
    mode under ``torch.no_grad()`` on the model's own device, `batch_size` at a time. A model
    returning a tuple (AdaFace's backbone returns (embedding, norm)) contributes its first
    element. The model's train/eval mode is restored afterwards. Returns [N, ...] on that
    device.
    """
    from PIL import Image

    transform = transform or default_transform
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(paths), batch_size):
                images = []
                for path in paths[start : start + batch_size]:
                    with Image.open(path) as image:
                        images.append(transform(image.convert("RGB")))
                result = model(torch.stack(images).to(device))
                if isinstance(result, tuple | list):
                    result = result[0]
                out.append(result.float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def cosine_distance(probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of every probe row with every gallery row: [p, g]."""
    p = torch.nn.functional.normalize(probe.flatten(1).float(), dim=1)
    g = torch.nn.functional.normalize(gallery.flatten(1).float(), dim=1)
    return 1.0 - p @ g.T


def matcher_distance(matcher: Matcher, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Pairwise distances [p, g] (smaller is closer) from `matcher`.

    A QAConv-style matcher (an object with ``make_kernel``) is used as the seed's
    ``pairwise_distance`` uses it: ``make_kernel(probe)``, ``score = matcher(gallery)``
    laid out [p, g], distance = 1 - sigmoid(score / 10). Any other callable is
    ``matcher(probe, gallery) -> [p, g] distances``.
    """
    with torch.no_grad():
        if hasattr(matcher, "make_kernel"):
            matcher.make_kernel(probe)
            score = torch.as_tensor(matcher(gallery))
            return 1.0 - torch.sigmoid(score.float() / 10)
        return torch.as_tensor(matcher(probe, gallery)).float()


def matcher_knn(
    features: torch.Tensor,
    k: int,
    matcher: Matcher | None = None,
    prob_batch_size: int = 256,
    gal_batch_size: int = 256,
) -> np.ndarray:
    """Each row's `k` nearest other rows under `matcher` (cosine distance when None).

    Tiles of `prob_batch_size` x `gal_batch_size` distances, on the features' device, are
    folded into a running top-k per row; a row is never its own neighbour (the seed adds
    1e15 to the diagonal). Returns [N, k] int64, nearest first; equal distances come back
    lowest index first.
    """
    n = features.shape[0]
    if not 0 <= k < max(n, 1):
        raise ValueError(f"k must be in 0..N-1 = {n - 1}, got {k}")
    if k == 0:
        return np.zeros((n, 0), np.int64)
    device = features.device
    best = torch.full((n, k), torch.inf, device=device)
    best_idx = torch.full((n, k), -1, dtype=torch.int64, device=device)
    for a in range(0, n, prob_batch_size):
        rows = slice(a, min(a + prob_batch_size, n))
        for b in range(0, n, gal_batch_size):
            cols = min(b + gal_batch_size, n)
            if matcher is None:
                tile = cosine_distance(features[rows], features[b:cols])
            else:
                tile = matcher_distance(matcher, features[rows], features[b:cols])
            tile = tile.to(device=device, dtype=torch.float32)
            own = torch.arange(rows.start, rows.stop, device=device)
            inside = (own >= b) & (own < cols)
            tile[inside.nonzero()[:, 0], own[inside] - b] = torch.inf
            vals, idx = torch.topk(tile, min(k, tile.shape[1]), dim=1, largest=False)
            merged = torch.cat([best[rows], vals], 1)
            merged_idx = torch.cat([best_idx[rows], idx + b], 1)
            top, pos = torch.topk(merged, k, dim=1, largest=False)
            best[rows] = top
            best_idx[rows] = torch.gather(merged_idx, 1, pos)
    dist, idx = best.cpu().numpy(), best_idx.cpu().numpy()
    order = np.lexsort((idx, dist), axis=1)
    return np.take_along_axis(idx, order, 1)
