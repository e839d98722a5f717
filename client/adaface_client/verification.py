"""Face-verification metrics: 10-fold accuracy with held-out thresholds, TAR at FAR, ROC.

The k-fold procedure is InsightFace's (the one AdaFace reports): pairs are split into k
consecutive folds; on each fold the threshold that maximises accuracy on the other k-1
folds is applied to it. Thresholds are a grid over the cosine similarity of L2-normalised
embeddings: InsightFace's squared-distance grid `arange(0, 4, 0.01)` maps to cosine
`1 - d/2`, so the grid is cosine 1.0 down to -0.995 in steps of 0.005 and a pair is
accepted when its similarity is strictly above the threshold (distance strictly below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "Roc",
    "VerificationResult",
    "cosine_scores",
    "grid_thresholds",
    "kfold_accuracy",
    "roc_curve",
    "threshold_at_far",
    "verification_result",
]

DEFAULT_FARS: tuple[float, ...] = (1e-3, 1e-4)


def grid_thresholds() -> np.ndarray:
    """Cosine thresholds equivalent to InsightFace's squared-distance grid arange(0, 4, 0.01)."""
    return 1.0 - np.arange(0.0, 4.0, 0.01) / 2.0


def cosine_scores(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of consecutive rows (0,1), (2,3), ...: float64 [N/2].

    Rows are L2-normalised here, so unnormalised features are fine too.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] % 2:
        raise ValueError(f"embeddings must be [2*pairs, dim], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("embeddings contain a zero or non-finite row")
    x = x / norms
    return np.sum(x[0::2] * x[1::2], axis=1)


def _check_pairs(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    same = np.asarray(issame).reshape(-1)
    if same.dtype != np.bool_:
        if not np.all(np.isin(same, (0, 1))):
            raise ValueError("issame must hold booleans or 0/1")
        same = same.astype(bool)
    if s.shape != same.shape:
        raise ValueError(f"{s.size} scores but {same.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, same


def _accuracies(scores: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy at every threshold at once: [len(thresholds)]."""
    accept = scores[None, :] > thresholds[:, None]
    return np.mean(accept == issame[None, :], axis=1)


def kfold_accuracy(
    scores: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    thresholds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold (accuracy, threshold): each fold scored at the best threshold of the others.

    Folds are consecutive slices (sklearn KFold without shuffling: the first N % k folds
    hold one extra pair). Ties between thresholds go to the first in grid order (the
    highest similarity), as numpy argmax does in InsightFace's code.
    """
    s, same = _check_pairs(scores, issame)
    if n_folds < 2 or s.size < n_folds:
        raise ValueError(f"need at least {max(n_folds, 2)} pairs for {n_folds} folds, got {s.size}")
    grid = grid_thresholds() if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    accuracies = np.empty(n_folds)
    best = np.empty(n_folds)
    for k, test in enumerate(np.array_split(np.arange(s.size), n_folds)):
        train = np.ones(s.size, dtype=bool)
        train[test] = False
        best[k] = grid[int(np.argmax(_accuracies(s[train], same[train], grid)))]
        accuracies[k] = _accuracies(s[test], same[test], best[k : k + 1])[0]
    return accuracies, best


def threshold_at_far(scores: np.ndarray, issame: np.ndarray, far: float) -> float | None:
    """The lowest similarity threshold whose false-accept rate (score > threshold) is <= far.

    None when the different-identity pairs are too few to measure `far` (fewer than 1/far).
    """
    s, same = _check_pairs(scores, issame)
    negatives = np.sort(s[~same])[::-1]
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    if negatives.size == 0 or negatives.size * far < 1.0 - 1e-9:
        return None
    allowed = int(np.floor(negatives.size * far + 1e-9))
    return float(negatives[allowed]) if allowed < negatives.size else float(negatives[-1])


@dataclass(frozen=True)
class Roc:
    """ROC over every distinct score: accept when score > threshold."""

    thresholds: np.ndarray
    tar: np.ndarray
    far: np.ndarray


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> Roc:
    """TAR and FAR at each distinct score used as a threshold, plus one below every score."""
    s, same = _check_pairs(scores, issame)
    if same.all() or not same.any():
        raise ValueError("a ROC needs both same-identity and different-identity pairs")
    cuts = np.concatenate([np.unique(s)[::-1], [np.min(s) - 1e-6]])
    pos = np.sort(s[same])
    neg = np.sort(s[~same])
    tar = 1.0 - np.searchsorted(pos, cuts, side="right") / pos.size
    far = 1.0 - np.searchsorted(neg, cuts, side="right") / neg.size
    return Roc(thresholds=cuts, tar=tar, far=far)


@dataclass(frozen=True)
class VerificationResult:
    """What AdaFace reports for one validation set, plus TAR at the requested FARs."""

    pairs: int
    accuracy_mean: float
    accuracy_std: float
    best_threshold: float
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]
    # far -> (tar, threshold), or None where the pair count cannot measure that FAR.
    at_far: dict[float, tuple[float, float] | None] = field(default_factory=dict)


def verification_result(
    scores: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    fars: tuple[float, ...] = DEFAULT_FARS,
) -> VerificationResult:
    """Mean and (population) std of the k-fold accuracies, the mean chosen threshold, and
    TAR at each FAR over all pairs."""
    s, same = _check_pairs(scores, issame)
    acc, thr = kfold_accuracy(s, same, n_folds)
    at_far: dict[float, tuple[float, float] | None] = {}
    for far in fars:
        t = threshold_at_far(s, same, far)
        at_far[far] = None if t is None or not same.any() else (float(np.mean(s[same] > t)), t)
    return VerificationResult(
        pairs=int(s.size),
        accuracy_mean=float(np.mean(acc)),
        accuracy_std=float(np.std(acc)),
        best_threshold=float(np.mean(thr)),
        fold_accuracies=tuple(float(a) for a in acc),
        fold_thresholds=tuple(float(t) for t in thr),
        at_far=at_far,
    )
