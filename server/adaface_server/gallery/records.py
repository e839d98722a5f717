"""Plain records the gallery service takes and returns (no grpc, no storage)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..preprocess.pipeline import ImageItem
from .index import Hit


@dataclass(frozen=True)
class SampleInput:
    """One enroll/search/verify input: an image to embed, or a precomputed vector."""

    image: ImageItem | None = None
    vector: np.ndarray | None = None  # float32 as sent (validated against the gallery's dim)
    dim: int = 0  # the sender's declared length; 0 when not given
    norm: float = 0.0


@dataclass(frozen=True)
class SampleOutcome:
    """A vector ready to use, or why the input produced none (per-image problems only)."""

    vector: np.ndarray | None = None  # unit float32
    norm: float = 0.0
    sample_id: int = 0
    error_reason: str | None = None
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.vector is not None


@dataclass(frozen=True)
class EnrollResult:
    identity: str
    created: bool
    samples: list[SampleOutcome]
    sample_count: int


@dataclass(frozen=True)
class ProbeOutcome:
    hits: list[Hit] = field(default_factory=list)
    error_reason: str | None = None
    error_message: str = ""


@dataclass(frozen=True)
class VerifyOperand:
    """An image or vector (`sample`), or an enrolled identity."""

    sample: SampleInput | None = None
    identity: str | None = None


@dataclass(frozen=True)
class VerifyResult:
    score: float
    match: bool
    threshold: float
    a_sample_id: int = 0
    b_sample_id: int = 0


@dataclass(frozen=True)
class GalleryView:
    name: str
    model_checksum: str
    model_name: str
    dim: int
    identity_count: int
    sample_count: int
    created_at: float
    metadata: dict[str, str]
    index: str
    dtype: str
    index_bytes: int
