"""What the in-process backends (TorchScript, OpenVINO) share: one thread that owns the
model, the spec and limits from the model's config.pbtxt, readiness, and the warm-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import Settings
from ..errors import Unavailable
from .base import LoadedModel

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class EmbeddedBackend(LoadedModel):
    """Base of the in-process backends: subclasses set `_spec` and `_runner` in `load`.

    One thread owns the model: the runtime parallelises inside a forward pass, and a single
    caller keeps batches from competing for the same cores."""

    name = "embedded"
    target = "the embedded backend"
    needs_batching = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._runner: Runner | None = None
        #: What runs, once loaded: e.g. "cpu" / "cuda:0" and "fp32" / "bf16" / "fp16".
        self.device = ""
        self.precision = ""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)

    def _warm_up(self, sizes: Sequence[int]) -> None:
        """Runs each batch size twice (runtimes plan kernels per input shape)."""
        assert self._runner is not None
        spec = self.spec
        dtype = np.uint8 if spec.input_dtype == "uint8" else np.float32
        for size in sizes:
            zeros = np.zeros((size, *spec.input_dims), dtype=dtype)
            for _ in range(2):
                self._runner(zeros)

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        runner = self._runner
        if runner is None:
            raise Unavailable(f"model {self._settings.model!r} is not loaded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, runner, batch)

    async def close(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=True)
