"""Verification accuracy of a served model: validation sets and labelled pairs through the server.

Images go to the Embedder as they are, declared pre-aligned for `.bin` crops, with or
without the server's flip fusion; the metrics are computed here (see verification).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adaface_client.bin_format import BinFormatError, ValidationSet, load_bin
from adaface_client.verification import (
    DEFAULT_FARS,
    VerificationResult,
    cosine_scores,
    verification_result,
)

__all__ = [
    "BinFormatError",
    "DatasetResult",
    "EvaluationError",
    "LabelledPairs",
    "ValidationSet",
    "embed_images",
    "evaluate_set",
    "far_key",
    "load_bin",
    "load_pairs_csv",
    "pair_scores",
]


class EvaluationError(Exception):
    """Images that could not be embedded, or an unusable pairs file; the message says which."""


def far_key(far: float) -> str:
    """The JSON key for a FAR, e.g. 0.001 -> "1e-03"."""
    return f"{far:.0e}"


@dataclass(frozen=True)
class DatasetResult:
    """One validation set scored through the server with one flip setting."""

    dataset: str
    flip_fusion: bool
    result: VerificationResult
    scores: np.ndarray
    issame: np.ndarray
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "dataset": self.dataset,
            "pairs": r.pairs,
            "accuracy_mean": r.accuracy_mean,
            "accuracy_std": r.accuracy_std,
            "best_threshold": r.best_threshold,
            "tar_at_far": {
                far_key(far): None if v is None else v[0] for far, v in r.at_far.items()
            },
            "threshold_at_far": {
                far_key(far): None if v is None else v[1] for far, v in r.at_far.items()
            },
            "flip_fusion": self.flip_fusion,
            "model": self.model,
        }


def embed_images(
    client: Any,
    images: Sequence[Any],
    *,
    flip: bool,
    alignment: str,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Embeddings [N, D] of `images` in order; EvaluationError naming the first failures."""
    results = client.embed_results(images, alignment=alignment, flip=flip, progress=progress)
    failed = [r for r in results if not r.ok]
    if failed:
        shown = "; ".join(f"image {r.index}: {r.reason} {r.message}".strip() for r in failed[:3])
        raise EvaluationError(f"{what}: {len(failed)} of {len(results)} images failed ({shown})")
    return np.stack([r.embedding for r in results]).astype(np.float32, copy=False)


def pair_scores(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of each consecutive pair of embeddings."""
    return cosine_scores(embeddings)


def evaluate_set(
    client: Any,
    dataset: ValidationSet,
    *,
    flip: bool,
    n_folds: int = 10,
    fars: tuple[float, ...] = DEFAULT_FARS,
    progress: Callable[[int], None] | None = None,
    model: str = "",
) -> DatasetResult:
    """Send a validation set's crops (declared aligned) through the server and score it."""
    embeddings = embed_images(
        client,
        dataset.images,
        flip=flip,
        alignment="aligned",
        what=dataset.name,
        progress=progress,
    )
    scores = pair_scores(embeddings)
    result = verification_result(scores, dataset.issame, n_folds=n_folds, fars=fars)
    return DatasetResult(dataset.name, flip, result, scores, dataset.issame, model)


@dataclass(frozen=True)
class LabelledPairs:
    """Image pairs from a CSV: paths resolved, laid out (a0, b0, a1, b1, ...) with labels."""

    name: str
    images: list[Path]
    issame: np.ndarray


_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"0", "false", "no"})


def load_pairs_csv(path: str | Path) -> LabelledPairs:
    """Rows `image_a,image_b,same` (same: 1/0, true/false, yes/no); an optional header row;
    relative paths are taken from the CSV's folder. EvaluationError names the file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvaluationError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    images: list[Path] = []
    labels: list[bool] = []
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 3:
            raise EvaluationError(
                f"{p}:{line_no}: need image_a,image_b,same; got {len(row)} fields"
            )
        flag = row[2].strip().lower()
        if flag not in _TRUE | _FALSE:
            if line_no == 1 and not images:
                continue  # a header row
            raise EvaluationError(f"{p}:{line_no}: same must be 1/0 or true/false, got {row[2]!r}")
        for cell in row[:2]:
            image = Path(cell.strip())
            image = image if image.is_absolute() else p.parent / image
            if not image.is_file():
                raise EvaluationError(f"{p}:{line_no}: no such image {cell.strip()!r}")
            images.append(image)
        labels.append(flag in _TRUE)
    if not labels:
        raise EvaluationError(f"{p}: no pairs")
    return LabelledPairs(name=p.stem, images=images, issame=np.asarray(labels, dtype=bool))
