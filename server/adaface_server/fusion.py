"""Flip fusion: the seed's norm-weighted sum of the two views of each image."""

from __future__ import annotations

import numpy as np

from adaface_client.utils import fuse_features_with_norm


def fuse_flip_pairs(embeddings: np.ndarray, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows (2i, 2i+1) are an image and its mirror -> fused [N,D] and norms [N,1]."""
    views = np.stack([embeddings[0::2], embeddings[1::2]])
    view_norms = np.stack([norms[0::2], norms[1::2]])
    fused, fused_norm = fuse_features_with_norm(views, view_norms)
    return fused.astype(np.float32, copy=False), fused_norm.astype(np.float32, copy=False)
