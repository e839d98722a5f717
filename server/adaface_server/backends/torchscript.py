"""Embedded backend: the exported TorchScript model run in-process on a dedicated thread, on
the device and at the precision chosen at load (backends/precision.py)."""

from __future__ import annotations

import asyncio
import logging
import os

from ..errors import StartupError, Unavailable
from ..models.repository import ModelRepositoryError, ModelSpec, load_model_spec
from .embedded import EmbeddedBackend

log = logging.getLogger(__name__)


class TorchScriptBackend(EmbeddedBackend):
    """Loads `<repository>/<model>/<version>/model.pt`; limits come from the same config.pbtxt
    Triton reads, so the embedded and Triton backends cannot disagree."""

    name = "torchscript"
    target = "the embedded TorchScript backend"

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

        from . import precision

        try:
            device = precision.resolve_device(self._settings.device)
        except precision.PrecisionError as exc:
            raise StartupError(str(exc)) from None
        threads = self._settings.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        log.info(
            "loading %s (%s) on %s with %d threads", spec.model_path, spec.arch, device, threads
        )
        precision.exact_fp32_on_cuda(device)
        module = torch.jit.load(str(spec.model_path), map_location=device)
        module.eval()
        exported = str(spec.metadata.get("precision", "fp32"))
        requested = self._settings.precision
        if exported != "fp32":
            # A reduced-precision export (adaface-export --precision) already ran its parity
            # gate at export time; it runs as exported, behind the same fp32 I/O.
            if requested not in ("auto", exported):
                raise StartupError(
                    f"model {spec.name} was exported in {exported}: serve it with --precision "
                    f"auto or {exported}, or export it in fp32 for --precision {requested}"
                )
            log.info(
                "model %s was exported in %s (export gate: min cosine %s to fp32); runs as is",
                spec.name,
                exported,
                spec.metadata.get("min_cosine"),
            )
            self._runner = precision.ModelRunner(
                module, device, "fp32", self.max_batch_size, spec.input_dtype
            )
            self.device, self.precision = str(device), exported
        else:
            try:
                selection = precision.select_runner(
                    module, device, requested, self.max_batch_size, input_dtype=spec.input_dtype
                )
            except precision.PrecisionError as exc:
                raise StartupError(str(exc)) from None
            self._runner = selection.runner
            self.device, self.precision = str(device), selection.precision
        # TorchScript's profiling executor specialises on the first calls, and CUDA picks
        # kernels per shape: run every batch size the batcher produces on CUDA (any size up
        # to the maximum), the common ones on CPU, before declaring the model ready.
        if device.type == "cuda":
            sizes = list(range(1, self.max_batch_size + 1))
        else:
            sizes = sorted({1, 2, max(1, self.max_batch_size // 2), self.max_batch_size})
        self._warm_up(sizes)
        log.info(
            "model %s runs on %s in %s with %s input (requested --device %s --precision %s); "
            "warmed up for batch sizes %s",
            spec.name,
            self.device,
            self.precision,
            spec.input_dtype,
            self._settings.device,
            self._settings.precision,
            _ranges(sizes),
        )


def _ranges(sizes: list[int]) -> str:
    if len(sizes) > 4 and sizes == list(range(sizes[0], sizes[-1] + 1)):
        return f"{sizes[0]}..{sizes[-1]}"
    return ", ".join(map(str, sizes))
