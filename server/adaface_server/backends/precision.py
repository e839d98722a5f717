"""Device and precision of the embedded model: resolving `auto`, the parity gate, the runner.

The model contract holds for every precision: the runner takes [B,3,112,112] in the model's
input dtype (float32 normalised, or uint8 pixels for an `--input-dtype uint8` export) and
returns float32 embeddings and norms. Reduced precision runs the fp32 TorchScript file under
`torch.autocast` (bf16 on CPUs with native bf16 dot products, fp16 or bf16 on CUDA): measured
on a 2-core AMD EPYC with AVX-512 BF16 it is as fast as a separately exported bf16 file
(README, "Device and precision"), and it needs no second model file.

Before a reduced precision serves, a parity gate compares it with fp32 on a fixed
verification batch; `auto` then picks the fastest precision that passed (timed at load),
falling back to fp32.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEVICES_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: A reduced precision serves only when every verification embedding keeps this cosine to fp32.
GATE_MIN_COSINE = 0.9995
#: `auto` takes a reduced precision only when it is clearly faster than fp32 at load.
AUTO_MIN_SPEEDUP = 1.1
VERIFICATION_BATCH = 8
#: Batch on which `auto` times the precisions on CUDA (capped by the model's max batch).
CUDA_TIMING_BATCH = 64
TIMED_CALLS = 3


class PrecisionError(RuntimeError):
    """The requested device or precision cannot run here, or failed its parity gate."""


def resolve_device(setting: str):
    """torch.device for --device: auto = cuda when CUDA is present, else cpu."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise PrecisionError(f"--device must be {DEVICES_HELP}, got {setting!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise PrecisionError(f"--device must be {DEVICES_HELP}, got {setting!r}")
    if not torch.cuda.is_available():
        raise PrecisionError(f"--device {setting}: no CUDA device is available")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise PrecisionError(
            f"--device {setting}: only {torch.cuda.device_count()} CUDA device(s) present"
        )
    return torch.device("cuda", index)


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX-512 BF16 or AMX)."""
    import torch

    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    return False


def reduced_precisions(device) -> list[str]:
    """Reduced precisions worth trying on device, most promising first."""
    import torch

    if device.type == "cuda":
        found = ["fp16"]
        if torch.cuda.is_bf16_supported():
            found.append("bf16")
        return found
    return ["bf16"] if cpu_supports_bf16() else []


def check_supported(device, precision: str) -> None:
    """Raises PrecisionError when an explicitly requested precision cannot run on device."""
    if precision in ("auto", "fp32"):
        return
    if precision == "fp16" and device.type != "cuda":
        raise PrecisionError("--precision fp16 needs a CUDA device (CPUs lack fast fp16 kernels)")
    if precision not in reduced_precisions(device):
        raise PrecisionError(f"--precision {precision} is not supported on {device}")


@dataclass(frozen=True)
class DetectorPlacement:
    """Where and how MTCNN runs: a torch device, a precision and a runtime."""

    device: Any
    precision: str
    runtime: str  # "torch" or "openvino"


def detector_placement(
    device_setting: str, precision_setting: str, model_device: str, runtime_setting: str = "torch"
) -> DetectorPlacement:
    """Placement of the face detector.

    --detect-device auto follows the model's --device; --detect-precision auto is fp16 on
    CUDA and fp32 on CPUs, where bf16 ran MTCNN's few-channel convolutions, PReLUs and pools
    slower than fp32 (bench/bench_detect.py prints both). --detect-runtime auto is OpenVINO
    on the CPU when it is installed, torch otherwise; openvino runs on the CPU only, in fp32
    or bf16."""
    try:
        device = resolve_device(model_device if device_setting == "auto" else device_setting)
    except PrecisionError as exc:
        if device_setting == "auto":
            raise
        raise PrecisionError(str(exc).replace("--device", "--detect-device")) from None
    if precision_setting == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    else:
        try:
            check_supported(device, precision_setting)
        except PrecisionError as exc:
            raise PrecisionError(str(exc).replace("--precision", "--detect-precision")) from None
        precision = precision_setting
    from .openvino import openvino_available

    runtime = runtime_setting
    if runtime == "auto":
        runtime = "openvino" if device.type == "cpu" and openvino_available() else "torch"
    elif runtime == "openvino":
        if device.type != "cpu":
            raise PrecisionError(f"--detect-runtime openvino runs on the CPU, not {device}")
        if not openvino_available():
            raise PrecisionError(
                "--detect-runtime openvino needs the openvino package "
                "(pip install 'adaface-serving[openvino]')"
            )
    return DetectorPlacement(device, precision, runtime)


class ModelRunner:
    """Runs a TorchScript module on one device at one precision: numpy in (float32, or uint8
    pixels when input_dtype is "uint8"), fp32 out.

    Not thread-safe: the backend calls it from its single model thread, which is also what
    makes reusing the pinned host buffers safe on CUDA.
    """

    def __init__(
        self, module, device, precision: str, max_batch_size: int, input_dtype: str = "fp32"
    ) -> None:
        import torch

        self.module = module
        self.device = device
        self.precision = precision
        self.input_dtype = input_dtype
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self._cuda = device.type == "cuda"
        self._pinned = None
        if self._cuda:
            # Page-locked host memory lets the copies run asynchronously (non_blocking).
            self._pinned = torch.empty(
                (max_batch_size, 3, 112, 112),
                dtype=torch.uint8 if input_dtype == "uint8" else torch.float32,
                pin_memory=True,
            )

    def _autocast(self):
        import torch

        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if self._cuda:
                staged = self._pinned[: x.shape[0]]
                staged.copy_(x)
                x = staged.to(self.device, non_blocking=True)
            with self._autocast():
                embeddings, norms = self.module(x)
            # The contract is fp32 out, whatever ran inside.
            embeddings, norms = embeddings.float(), norms.float()
            if self._dtype is not None:
                # Autocast also runs the model's own L2 normalisation in reduced precision:
                # bf16 vectors came out up to 0.25% off unit length (Xeon with AMX). The
                # direction is the model's; unit length is the contract, restored in fp32.
                embeddings = torch.nn.functional.normalize(embeddings, dim=1)
            if self._cuda:
                embeddings = embeddings.to("cpu", non_blocking=True)
                norms = norms.to("cpu", non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
        return embeddings.numpy(), norms.numpy()


@dataclass(frozen=True)
class Trial:
    """One precision measured against fp32 on the verification batch at load."""

    precision: str
    min_cosine: float
    max_rel_norm_error: float
    seconds_per_batch: float

    @property
    def passed(self) -> bool:
        return self.min_cosine >= GATE_MIN_COSINE


def parity(
    reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float]:
    """(min cosine of embeddings, max relative norm error) of candidate vs fp32 reference."""
    emb_ref, norm_ref = (np.asarray(a, dtype=np.float64) for a in reference)
    emb, norm = (np.asarray(a, dtype=np.float64) for a in candidate)
    cos = (emb * emb_ref).sum(1) / (
        np.linalg.norm(emb, axis=1) * np.linalg.norm(emb_ref, axis=1)
    ).clip(1e-12)
    rel = np.abs(norm - norm_ref) / np.abs(norm_ref).clip(1e-12)
    return float(cos.min()), float(rel.max())


def choose(requested: str, trials: Sequence[Trial]) -> str:
    """The precision to serve. trials[0] is fp32 (the reference).

    auto: the fastest reduced precision that passed the gate and beats fp32 by
    AUTO_MIN_SPEEDUP, else fp32. An explicit reduced precision must pass the gate.
    """
    fp32 = trials[0]
    if requested == "fp32":
        return "fp32"
    if requested != "auto":
        trial = next(t for t in trials if t.precision == requested)
        if not trial.passed:
            raise PrecisionError(
                f"--precision {requested} failed the parity gate: min cosine to fp32 "
                f"{trial.min_cosine:.6f} < {GATE_MIN_COSINE} (use --precision fp32)"
            )
        return requested
    fast = [
        t
        for t in trials[1:]
        if t.passed and t.seconds_per_batch * AUTO_MIN_SPEEDUP <= fp32.seconds_per_batch
    ]
    if not fast:
        return "fp32"
    return min(fast, key=lambda t: t.seconds_per_batch).precision


def _time(run: Callable[[np.ndarray], object], batch: np.ndarray) -> float:
    samples = []
    for _ in range(TIMED_CALLS):
        started = time.perf_counter()
        run(batch)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def verification_inputs(batch_size: int = VERIFICATION_BATCH, dtype: str = "fp32") -> np.ndarray:
    """Deterministic inputs (numpy, seed 0): in the model's [-1, 1] range, or with dtype
    "uint8" pixels 0..255 for a model that normalises them itself."""
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        return rng.integers(0, 256, (batch_size, 3, 112, 112), dtype=np.uint8)
    return (rng.random((batch_size, 3, 112, 112), dtype=np.float32) * 2 - 1).astype(np.float32)


@dataclass(frozen=True)
class Selection:
    runner: ModelRunner
    trials: tuple[Trial, ...]

    @property
    def precision(self) -> str:
        return self.runner.precision


def select_runner(
    module,
    device,
    requested: str,
    max_batch_size: int,
    warm_calls: int = 2,
    input_dtype: str = "fp32",
) -> Selection:
    """Gate every candidate precision against fp32 on the verification batch and pick one.

    Only precisions that could be chosen are tried: none for `fp32` (served as is), fp32 and
    the requested one for an explicit reduced precision, every supported one for `auto`.
    """
    check_supported(device, requested)
    if requested == "fp32":  # nothing to compare: fp32 is the reference
        runner = ModelRunner(module, device, "fp32", max_batch_size, input_dtype)
        return Selection(runner, (Trial("fp32", 1.0, 0.0, 0.0),))
    if requested == "auto":
        candidates = reduced_precisions(device)
    elif requested == "fp32":
        candidates = []
    else:
        candidates = [requested]
    batch = verification_inputs(min(VERIFICATION_BATCH, max_batch_size), input_dtype)
    timing = None
    if device.type == "cuda":
        # At batch 8 a GPU mostly waits on kernel launches, whatever the precision: time
        # the choice where the batcher's full batches run.
        timing = verification_inputs(min(CUDA_TIMING_BATCH, max_batch_size), input_dtype)
    runners = {
        p: ModelRunner(module, device, p, max_batch_size, input_dtype)
        for p in ["fp32", *candidates]
    }
    chosen, trials = gate(runners, requested, batch, str(device), warm_calls, timing)
    return Selection(runners[chosen], trials)


def gate(
    runners: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]],
    requested: str,
    batch: np.ndarray,
    where: str,
    warm_calls: int = 2,
    timing: np.ndarray | None = None,
) -> tuple[str, tuple[Trial, ...]]:
    """(precision to serve, trials): every runner (keyed by precision, "fp32" first: the
    reference) is warmed, timed when there is a choice to make (on `timing` when given, else
    on batch), and compared with fp32 on batch; `choose` then applies the rule. Shared by
    every runtime (TorchScript, OpenVINO), so one gate and one rule decide what serves.
    `where` names the device in the log."""
    reference = None
    trials = []
    timed = len(runners) > 1
    timing = batch if timing is None else timing
    for precision, runner in runners.items():
        for _ in range(warm_calls):
            out = runner(batch)
        if timed and timing is not batch:
            for _ in range(warm_calls):
                runner(timing)
        seconds = _time(runner, timing) if timed else 0.0
        reference = reference or out
        cos, rel = parity(reference, out)
        trials.append(Trial(precision, cos, rel, seconds))
    chosen = choose(requested, trials)
    for trial in trials[1:]:
        log.info(
            "parity gate %s vs fp32 on %s: min cosine %.6f (gate %.4f: %s), max rel norm error "
            "%.2e, %.1f ms/batch of %d vs %.1f ms in fp32",
            trial.precision,
            where,
            trial.min_cosine,
            GATE_MIN_COSINE,
            "pass" if trial.passed else "FAIL",
            trial.max_rel_norm_error,
            trial.seconds_per_batch * 1e3,
            timing.shape[0],
            trials[0].seconds_per_batch * 1e3,
        )
    if requested == "auto":
        log.info(
            "precision auto on %s -> %s (tried %s)",
            where,
            chosen,
            ", ".join(t.precision for t in trials),
        )
    return chosen, tuple(trials)


def exact_fp32_on_cuda(device) -> None:
    """fp32 on CUDA means fp32: TF32 convolutions and matmuls would cost ~1e-4 of parity,
    both in fp32 serving and in the fp32 reference of the gate (autocast ignores the flags)."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
