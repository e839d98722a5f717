"""The inference backend Protocol and the factory that picks one by name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import Unavailable

if TYPE_CHECKING:
    from ..config import Settings
    from ..models.repository import ModelSpec


class Backend(Protocol):
    """Runs the exported model on preprocessed batches [B,3,112,112] in `spec.input_dtype`:
    float32 normalised, or uint8 pixels for a model that normalises them itself."""

    name: str
    #: Where the model runs, for error messages (e.g. "Triton at triton:8001").
    target: str
    #: True when the server must coalesce requests itself; False when the backend
    #: (e.g. Triton's dynamic batcher) already does.
    needs_batching: bool

    @property
    def spec(self) -> ModelSpec:
        """The model's names, dims and limits; valid once `load` has returned."""
        ...

    @property
    def max_batch_size(self) -> int: ...

    async def load(self) -> None:
        """Loads and warms the model; raises errors.Unavailable if it cannot (yet)."""
        ...

    def ready(self) -> bool: ...

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (embeddings [B,D] unit-norm float32, norms [B,1] float32)."""
        ...

    async def close(self) -> None: ...


class LoadedModel:
    """The spec, limit and readiness every backend reports the same way: a subclass sets
    `_spec` once its model is loaded and `_ready` while it serves."""

    target: str

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._spec: ModelSpec | None = None
        self._ready = False

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            raise Unavailable(f"model {self._settings.model!r} on {self.target} is not loaded")
        return self._spec

    @property
    def max_batch_size(self) -> int:
        return effective_max_batch_size(self.spec, self._settings)

    def ready(self) -> bool:
        return self._ready


def effective_max_batch_size(spec: ModelSpec, settings: Settings) -> int:
    """The model config's max_batch_size, lowered (never raised) by --max-batch-size."""
    if settings.max_batch_size:
        return min(spec.max_batch_size, settings.max_batch_size)
    return spec.max_batch_size


def embedded_runtime(settings: Settings) -> str:
    """The runtime the embedded backend uses: --runtime, or for `auto` OpenVINO when the
    model's IR is exported (adaface-export --openvino), openvino is installed and the device
    is the CPU; else TorchScript. OpenVINO bf16 served 1.4-1.9x TorchScript under autocast bf16
    in `make bench` (README, "Hardware: benchmarks"). Decided once, at start-up."""
    if settings.runtime != "auto":
        return settings.runtime
    from .openvino import ir_exists, openvino_available

    if settings.device not in ("auto", "cpu") or not ir_exists(settings):
        return "torchscript"
    if settings.device == "auto":
        import torch

        if torch.cuda.is_available():
            return "torchscript"
    return "openvino" if openvino_available() else "torchscript"


def create_backend(settings: Settings) -> Backend:
    if settings.backend == "torchscript":
        if embedded_runtime(settings) == "openvino":
            from .openvino import OpenVINOBackend

            return OpenVINOBackend(settings)
        from .torchscript import TorchScriptBackend

        return TorchScriptBackend(settings)
    if settings.backend == "triton":
        from .triton import TritonBackend  # type: ignore[import-not-found]

        return TritonBackend(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")
