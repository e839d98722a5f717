"""Embedded backend: the exported TorchScript model run in-process on a dedicated thread."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..config import Settings
from ..errors import Unavailable
from ..models.repository import ModelRepositoryError, ModelSpec, load_model_spec
from .base import effective_max_batch_size

log = logging.getLogger(__name__)


class TorchScriptBackend:
    """Loads `<repository>/<model>/<version>/model.pt`; limits come from the same config.pbtxt
    Triton reads, so the embedded and Triton backends cannot disagree."""

    name = "torchscript"
    target = "the embedded TorchScript backend"
    needs_batching = True

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._spec: ModelSpec | None = None
        self._module = None
        self._ready = False
        # One thread owns the model: torch parallelises inside a forward pass, and a single
        # caller keeps batches from competing for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchscript")

    @property
    def spec(self) -> ModelSpec:
        if self._spec is None:
            raise Unavailable(f"model {self._settings.model!r} is not loaded")
        return self._spec

    @property
    def max_batch_size(self) -> int:
        return effective_max_batch_size(self.spec, self._settings)

    def ready(self) -> bool:
        return self._ready

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            spec = load_model_spec(self._settings.model_repository, self._settings.model)
        except ModelRepositoryError as exc:
            raise Unavailable(str(exc)) from None
        self._spec = spec
        await loop.run_in_executor(self._executor, self._load_sync, spec)
        self._ready = True

    def _load_sync(self, spec: ModelSpec) -> None:
        import torch

        threads = self._settings.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        log.info("loading %s (%s) with %d threads", spec.model_path, spec.arch, threads)
        module = torch.jit.load(str(spec.model_path), map_location="cpu")
        module.eval()
        self._module = module
        # TorchScript's profiling executor specialises on the first calls: run each batch
        # size the batcher will commonly produce before declaring the model ready.
        sizes = sorted({1, 2, max(1, self.max_batch_size // 2), self.max_batch_size})
        for size in sizes:
            zeros = np.zeros((size, *spec.input_dims), dtype=np.float32)
            for _ in range(2):
                self._infer_sync(zeros)
        log.info("model %s warmed up for batch sizes %s", spec.name, sizes)

    def _infer_sync(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            embeddings, norms = self._module(torch.from_numpy(batch))
        return embeddings.numpy(), norms.numpy()

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._module is None:
            raise Unavailable(f"model {self._settings.model!r} is not loaded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._infer_sync, batch)

    async def close(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=True)
