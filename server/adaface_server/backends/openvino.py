"""Embedded OpenVINO backend: the model's OpenVINO IR (adaface-export --openvino) run
in-process on the CPU on a dedicated thread, in fp32 or bf16 chosen by the same parity gate
as the TorchScript backend (backends/precision.py).

Which IR: `--model M` serves the Triton model `M_openvino` of the same repository (what
`adaface-export --openvino` writes beside M); `--model` may also name an `_openvino` model
directly. The precision is a compile-time hint (INFERENCE_PRECISION_HINT f32 or bf16) on the
fp32 IR; outputs are fp32 and, in bf16, the embeddings are re-normalised to unit length in
fp32 as the TorchScript runner does. PERFORMANCE_HINT LATENCY: one stream using every
`--threads` thread per batch, the shape of work the server's single model thread and its
batcher produce (THROUGHPUT splits the cores into streams that only pay off with several
requests in flight at once).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import StartupError, Unavailable
from ..models.repository import (
    EMBEDDING_NAME,
    NORM_NAME,
    OPENVINO_BACKEND,
    OPENVINO_SUFFIX,
    ModelRepositoryError,
    ModelSpec,
    load_model_spec,
    openvino_model_name,
    read_model_config,
)
from .embedded import EmbeddedBackend

log = logging.getLogger(__name__)

EXPORT_HINT = "adaface-export --openvino"


def openvino_available() -> bool:
    """True when the openvino package imports."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_model_for(settings: Settings) -> str:
    """The Triton model holding the IR that --runtime openvino serves for --model: --model
    itself when its config says backend "openvino", else <model>_openvino."""
    config_path = settings.model_repository / settings.model / "config.pbtxt"
    if settings.model.endswith(OPENVINO_SUFFIX) or (
        config_path.is_file() and _is_openvino_config(config_path)
    ):
        return settings.model
    return openvino_model_name(settings.model)


def _is_openvino_config(path) -> bool:
    try:
        return read_model_config(path).backend == OPENVINO_BACKEND
    except ModelRepositoryError:
        return False


def ir_exists(settings: Settings) -> bool:
    """True when the repository holds the IR --runtime openvino would serve for --model."""
    try:
        spec = load_model_spec(settings.model_repository, openvino_model_for(settings))
    except ModelRepositoryError:
        return False
    return spec.runtime == "openvino"


def cpu_supports_bf16() -> bool:
    """True when OpenVINO's CPU plugin has native bf16 kernels here (AMX or AVX-512 BF16)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINORunner:
    """One compiled IR at one precision: numpy in (float32, or uint8 pixels for a uint8-input
    export), fp32 (embeddings [B,D] unit-norm, norms [B,1]) out. Not thread-safe: one infer
    request, called from the backend's single model thread."""

    def __init__(self, compiled: Any, precision: str) -> None:
        self.compiled = compiled
        self.precision = precision
        self._request = compiled.create_infer_request()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self._request.infer({0: np.ascontiguousarray(batch)})
        # The request reuses its output buffers on the next call: copy them out.
        embeddings = np.array(outputs[EMBEDDING_NAME], dtype=np.float32)
        norms = np.array(outputs[NORM_NAME], dtype=np.float32)
        if self.precision != "fp32":
            # The graph's own L2 normalisation ran in bf16; unit length is the contract.
            lengths = np.linalg.norm(embeddings, axis=1, keepdims=True)
            embeddings = embeddings / np.maximum(lengths, 1e-12)
        return embeddings, norms


class OpenVINOBackend(EmbeddedBackend):
    """Serves `<repository>/<model>_openvino/<version>/model.xml` on the CPU; limits come from
    that model's config.pbtxt (the same tensors and max_batch_size as the TorchScript one)."""

    name = "openvino"
    target = "the embedded OpenVINO backend"

    def _load_spec(self) -> ModelSpec:
        settings = self._settings
        name = openvino_model_for(settings)
        try:
            spec = load_model_spec(settings.model_repository, name)
        except ModelRepositoryError as exc:
            if name == settings.model:
                raise Unavailable(str(exc)) from None
            try:
                load_model_spec(settings.model_repository, settings.model)
            except ModelRepositoryError:
                # Neither is there yet (e.g. an export still to come): retry like any
                # missing model.
                raise Unavailable(
                    f"{exc} (--runtime openvino serves the IR written by {EXPORT_HINT})"
                ) from None
            raise StartupError(
                f"--runtime openvino: model {settings.model!r} has no OpenVINO IR ({exc}); "
                f"export it with `{EXPORT_HINT}` (writes {name}), or serve it with "
                "--runtime torchscript"
            ) from None
        if spec.runtime != "openvino":
            raise StartupError(
                f"--runtime openvino: {spec.model_dir} is not an OpenVINO IR export "
                f"(metadata runtime {spec.runtime!r}); re-export with `{EXPORT_HINT}`"
            )
        return spec

    async def load(self) -> None:
        spec = self._load_spec()
        if not openvino_available():
            raise StartupError(
                "--runtime openvino: the openvino package is not installed "
                "(pip install 'adaface-serving[openvino]'; make venv installs it)"
            )
        self._spec = spec
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load_sync, spec)
        self._ready = True

    def _load_sync(self, spec: ModelSpec) -> None:
        import openvino as ov
        import torch

        from ..models.openvino_export import compile_ir
        from . import precision

        requested = self._settings.precision
        if self._settings.device not in ("auto", "cpu"):
            raise StartupError(
                f"--runtime openvino runs on the CPU; got --device {self._settings.device}"
            )
        cpu = torch.device("cpu")
        if requested == "fp16":
            raise StartupError("--precision fp16 needs a CUDA device (CPUs lack fast fp16 kernels)")
        bf16 = cpu_supports_bf16()
        if requested == "bf16" and not bf16:
            raise StartupError(f"--precision bf16 is not supported on {cpu} (OpenVINO)")
        threads = self._settings.threads or len(os.sched_getaffinity(0))
        log.info(
            "loading %s (%s) with OpenVINO %s on cpu with %d threads",
            spec.model_path,
            spec.arch,
            ov.get_version(),
            threads,
        )
        model = ov.Core().read_model(str(spec.model_path))
        if requested == "auto":
            candidates = ["fp32", "bf16"] if bf16 else ["fp32"]
        elif requested == "fp32":
            candidates = ["fp32"]
        else:
            candidates = ["fp32", requested]
        runners = {p: OpenVINORunner(compile_ir(model, p, threads), p) for p in candidates}
        if len(runners) == 1:
            chosen = "fp32"
        else:
            batch = precision.verification_inputs(
                min(precision.VERIFICATION_BATCH, self.max_batch_size), spec.input_dtype
            )
            try:
                chosen, _ = precision.gate(runners, requested, batch, "cpu (OpenVINO)")
            except precision.PrecisionError as exc:
                raise StartupError(str(exc)) from None
        self._runner = runners[chosen]
        self.device, self.precision = "cpu", chosen
        # The CPU plugin plans kernels per input shape: run the common batch sizes once.
        sizes = sorted({1, 2, max(1, self.max_batch_size // 2), self.max_batch_size})
        self._warm_up(sizes)
        log.info(
            "model %s runs with OpenVINO on cpu in %s with %s input (requested --precision %s, "
            "%d threads); warmed up for batch sizes %s",
            spec.name,
            self.precision,
            spec.input_dtype,
            requested,
            threads,
            ", ".join(map(str, sizes)),
        )
