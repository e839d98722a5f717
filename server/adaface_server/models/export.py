"""Exports an AdaFace IR backbone to TorchScript plus a Triton model-repository entry.

Usage: ``adaface-export --checkpoint adaface_ir50_ms1mv2.ckpt --arch ir_50`` writes
``model_repository/adaface_ir50/{config.pbtxt,1/model.pt,1/metadata.json}``. Without
``--checkpoint`` the weights are random (seeded) and the embeddings meaningless: that mode
exists for tests and benchmarks and says so loudly. ``--python-backend DIR`` also writes a
Triton python-backend twin (same tensors and batching, ``model.py`` running the same
``model.pt``) into ``DIR/<name>``, for Triton builds without the PyTorch backend.
``--format arcface_torch --arch r50`` reads an InsightFace arcface_torch ``backbone.pth``
instead; such a model is fed RGB, and metadata.json ("input") and config.pbtxt (parameter
``channel_order``) record that so the server preprocesses for it. ``--input-dtype uint8``
makes ``INPUT__0`` a UINT8 tensor of raw 0..255 pixels (same layout and channel order)
normalised inside the graph, bit for bit as the server would: a client or the server's Triton
backend then sends 112*112*3 = 37,632 bytes per image instead of 150,528. ``--openvino``
also writes the OpenVINO IR of the same weights as the Triton model ``<name>_openvino``
(``backend: "openvino"``; see models/openvino_export.py), verified like the fp32 TorchScript
file (max abs 1e-5 vs eager), for ``--runtime openvino`` and Triton's OpenVINO backend.

Graph choice (measured with ``bench/bench_model.py``-style runs, random ir_50, torch 2.13 CPU,
2-core AVX-512 EPYC, best of 3 x 2 s; a busy neighbour makes absolute figures drift):

    img/s                     batch 8, 2 threads     batch 1, 1 thread
    eager                           19.6                   8.5
    trace                           20.0                   9.0
    trace+freeze                    18.2                   9.1
    trace+freeze+opt_for_inf        21.2                   9.4
    channels_last eager             22.4                   9.4
    channels_last trace             22.2                   9.9
    channels_last trace+freeze      23.0                  10.3   <- default
    channels_last freeze+opt_inf    21.7                   9.3

channels_last is worth 10-15%; freezing adds a little on top. ``optimize_for_inference``
gave nothing once channels_last was on, rewrites convolutions into MKLDNN-only ops (a file
that could not run under a GPU Triton instance) and, in torch 2.13, its saved file does not
even load back (``torch.jit.load``: "required keyword attribute 'value' is undefined"), so
it is not offered. Default: channels_last + freeze, the fastest graph that loads anywhere.
All variants stayed within 1.1e-6 of eager on embeddings (norms within 6e-7 relative).

``bench/bench_model.py`` sweep of the exported file (freeze), same machine, img/s:

    layout         threads   b1     b4     b8    b16    b32
    channels_last     1      8.9   11.5   12.0   11.5   11.3
    channels_last     2     16.8   21.8   22.6   21.4   19.8
    nchw              1      8.7   10.9   10.4    9.5    8.2
    nchw              2     15.1   20.7   20.2   18.8   15.1

Export itself takes ~1.5 s for ir_18 and ~4-10 s for ir_50 (trace, freeze, save, reload and
verify; slower when the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaface_server.models.checkpoint import CheckpointError
from adaface_server.models.formats import ADAFACE, FORMATS, get_format
from adaface_server.models.iresnet import EMBEDDING_DIM, build_model
from adaface_server.models.repository import (
    CONFIG_FILENAME,
    DEFAULT_CHANNEL_ORDER,
    DEFAULT_INPUT_DTYPE,
    DEFAULT_QUEUE_DELAY_US,
    EMBEDDING_NAME,
    INPUT_DIMS,
    INPUT_DTYPES,
    INPUT_NAME,
    METADATA_FILENAME,
    MODEL_FILENAME,
    NORM_NAME,
    OPENVINO_MODEL_FILENAME,
    ModelRepositoryError,
    atomic_write_bytes,
    build_model_config,
    format_model_config,
    load_model_spec,
    openvino_model_name,
    parse_model_config,
)
from adaface_server.preprocess.pipeline import normalise

EXPORTER_VERSION = "1"
OPTIMIZATIONS = ("none", "freeze")
DEFAULT_ARCH = "ir_50"
DEFAULT_REPOSITORY = Path("model_repository")
DEFAULT_MAX_BATCH_SIZE = 32
TOLERANCE = 1e-5
PRECISIONS = ("fp32", "bf16", "fp16")
#: Reduced-precision exports must keep this close to the fp32 eager model (verification batch).
REDUCED_MIN_COSINE = 0.999
REDUCED_MAX_REL_NORM_ERROR = 1e-2
WEIGHTS_CHECKPOINT = "checkpoint"
WEIGHTS_RANDOM = "random-untrained"
PREPROCESSING = ADAFACE.preprocessing()

log = logging.getLogger("adaface_server.export")


class ExportError(RuntimeError):
    """The exported TorchScript does not reproduce the eager model."""


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and how closely the TorchScript file matches eager PyTorch."""

    name: str
    version: int
    arch: str
    model_path: Path
    config_path: Path
    metadata_path: Path
    model_sha256: str
    max_abs_diff: float  # embeddings, TorchScript file vs eager model
    max_rel_norm_diff: float
    untrained: bool
    seconds: float
    precision: str = "fp32"
    min_cosine: float = 1.0
    input_dtype: str = DEFAULT_INPUT_DTYPE
    openvino: Any = None  # openvino_export.OpenVINOReport with --openvino


class _ChannelsLast(nn.Module):
    """Converts the NCHW input to channels_last so every conv runs in the faster layout."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


class _ReducedPrecision(nn.Module):
    """Runs the backbone in bf16/fp16 behind the fp32 contract: casts the fp32 input down,
    and computes the norm and the unit embedding from fp32 features (a bf16 norm alone would
    cost ~4e-3 relative error)."""

    def __init__(self, backbone: nn.Module, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.backbone = backbone.to(dtype)
        self.dtype = dtype
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone.unnormalised(x.to(self.dtype)).float()
        norm = torch.norm(features, 2, 1, True)
        return torch.div(features, norm), norm


class _PixelInput(nn.Module):
    """Takes uint8 pixels [N,3,112,112] and feeds the wrapped model normalised float32.

    The scaling is a 256-entry table made by the server's own `normalise`, so the model sees
    exactly the floats the server would have sent for an fp32-input export, on any device
    (CUDA's division by a scalar multiplies by the reciprocal, which can differ by 1 ulp)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        table = torch.from_numpy(normalise(np.arange(256, dtype=np.uint8)))
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner(self.table[x.long()])


def default_model_name(arch: str, model_format: str = "adaface") -> str:
    """<prefix><arch without underscores>, e.g. ir_50 -> adaface_ir50, r50 -> arcface_r50."""
    return get_format(model_format).default_model_name(arch)


def render_config(
    name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    instance_count: int = 1,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    channel_order: str = DEFAULT_CHANNEL_ORDER,
    input_dtype: str = DEFAULT_INPUT_DTYPE,
) -> str:
    """The exact config.pbtxt text the exporter writes for these settings."""
    config = build_model_config(
        name,
        max_batch_size,
        instance_count=instance_count,
        max_queue_delay_us=max_queue_delay_us,
        embedding_dim=EMBEDDING_DIM,
        channel_order=channel_order,
        input_dtype=input_dtype,
    )
    return format_model_config(config)


def verification_batch(batch_size: int = 4) -> torch.Tensor:
    """Deterministic inputs in the model's [-1, 1] range."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch_size, *INPUT_DIMS, generator=generator) * 2 - 1


def verification_pixels(batch_size: int = 4) -> torch.Tensor:
    """Deterministic uint8 pixels [N,3,112,112], for exports with --input-dtype uint8."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch_size, *INPUT_DIMS), generator=generator).to(torch.uint8)


def verification_inputs(input_dtype: str, batch_size: int = 4) -> torch.Tensor:
    """The parity gate's inputs in the exported model's input dtype."""
    if input_dtype == "uint8":
        return verification_pixels(batch_size)
    return verification_batch(batch_size)


def eager_input(batch: torch.Tensor) -> torch.Tensor:
    """What the eager fp32 model is fed for batch: uint8 pixels as the server normalises them."""
    if batch.dtype == torch.uint8:
        return torch.from_numpy(normalise(batch.numpy()))
    return batch


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _warn_untrained(arch: str, seed: int) -> None:
    for line in (
        "=" * 72,
        f"NO CHECKPOINT GIVEN: exporting RANDOM, UNTRAINED {arch} weights (seed {seed}).",
        "Embeddings from this model are MEANINGLESS: use it for tests and benchmarks only.",
        "Pass --checkpoint <adaface .ckpt> to export a real AdaFace model.",
        "=" * 72,
    ):
        log.warning(line)


@contextlib.contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """Silence torch 2.13's torch.jit deprecation warnings.

    Triton's libtorch backend loads only TorchScript, so for this exporter they are noise.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
        yield


def trace_backbone(
    model: nn.Module,
    optimization: str = "freeze",
    channels_last: bool = True,
    precision: str = "fp32",
    input_dtype: str = DEFAULT_INPUT_DTYPE,
) -> torch.jit.ScriptModule:
    """TorchScript for model (eval, no grad); channels_last and precision convert model in
    place. Outputs stay float32 for every precision; the input is float32 (normalised), or
    with input_dtype "uint8" raw pixels that the graph normalises in float32 before any
    reduced-precision cast."""
    if optimization not in OPTIMIZATIONS:
        raise ValueError(f"unknown optimization {optimization!r}; valid: {OPTIMIZATIONS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {PRECISIONS}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"unknown input dtype {input_dtype!r}; valid: {INPUT_DTYPES}")
    module: nn.Module = model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        module = _ReducedPrecision(model, dtype, channels_last).eval()
    elif channels_last:
        module = _ChannelsLast(model).eval()
    if input_dtype == "uint8":
        module = _PixelInput(module).eval()
    example = verification_inputs(input_dtype, 2)
    with torch.no_grad(), quiet_torchscript_deprecation():
        # Batch 2 keeps the trace free of batch-1 special cases; the graph is batch-agnostic.
        traced = torch.jit.trace(module, example, check_trace=False)
        if optimization == "freeze":
            traced = torch.jit.freeze(traced.eval())
    return traced


def min_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Smallest cosine between matching rows (embeddings are unit vectors already)."""
    ref, cand = reference.double(), candidate.double()
    cos = (ref * cand).sum(1) / (ref.norm(dim=1) * cand.norm(dim=1)).clamp_min(1e-12)
    return float(cos.min().item())


def compare_outputs(
    reference: tuple[torch.Tensor, torch.Tensor], candidate: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float]:
    """(max abs embedding diff, max relative norm diff)."""
    emb_ref, norm_ref = reference
    emb, norm = candidate
    if tuple(emb.shape) != tuple(emb_ref.shape) or tuple(norm.shape) != tuple(norm_ref.shape):
        raise ExportError(
            f"TorchScript output shapes {tuple(emb.shape)}, {tuple(norm.shape)} differ from "
            f"eager {tuple(emb_ref.shape)}, {tuple(norm_ref.shape)}"
        )
    abs_diff = (emb - emb_ref).abs().max().item()
    rel_diff = ((norm - norm_ref).abs() / norm_ref.abs().clamp_min(1e-12)).max().item()
    return float(abs_diff), float(rel_diff)


def export_model(
    checkpoint: Path | str | None,
    arch: str,
    repository: Path | str,
    name: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    seed: int = 0,
    *,
    instance_count: int = 1,
    version: int = 1,
    optimization: str = "freeze",
    channels_last: bool = True,
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    tolerance: float = TOLERANCE,
    precision: str = "fp32",
    reduced_min_cosine: float = REDUCED_MIN_COSINE,
    model_format: str = "adaface",
    input_dtype: str = DEFAULT_INPUT_DTYPE,
    openvino: bool = False,
) -> ExportReport:
    """Export arch (weights from checkpoint, or random when None) into repository/name.

    model_format picks the checkpoint family (see formats.FORMATS) and with it the input
    channel order recorded in metadata.json and config.pbtxt. precision bf16/fp16 writes a
    reduced-precision model (float32 in and out), verified by min cosine >=
    REDUCED_MIN_COSINE and max relative norm error <= REDUCED_MAX_REL_NORM_ERROR against the
    fp32 eager model instead of fp32's max abs `tolerance`. input_dtype "uint8" writes a model
    fed raw uint8 pixels (config TYPE_UINT8, metadata input_dtype), verified on pixels against
    the eager model fed the same pixels normalised as the server does. openvino also writes
    the fp32 OpenVINO IR as the Triton model <name>_openvino (openvino_export.py), held to
    the same `tolerance` as an fp32 TorchScript file."""
    if openvino:
        from adaface_server.models.openvino_export import require_openvino

        require_openvino()  # before any work: say how to install it
    started = time.perf_counter()
    fmt = get_format(model_format)
    fmt.check_arch(arch)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name!r}")
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    if optimization not in OPTIMIZATIONS:
        raise ValueError(
            f"unknown optimization {optimization!r}; valid: {', '.join(OPTIMIZATIONS)}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"unknown input dtype {input_dtype!r}; valid: {', '.join(INPUT_DTYPES)}")
    config_text = render_config(
        name, max_batch_size, instance_count, max_queue_delay_us, fmt.channel_order, input_dtype
    )

    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    if checkpoint_path is not None:
        eager = fmt.load(checkpoint_path, arch)
        checkpoint_sha = _sha256(checkpoint_path)
        weights = WEIGHTS_CHECKPOINT
    else:
        _warn_untrained(arch, seed)
        eager = fmt.build(arch)
        eager.load_state_dict(fmt.random_weights(arch, seed), strict=True)
        eager.eval()
        checkpoint_sha = None
        weights = WEIGHTS_RANDOM

    batch = verification_inputs(input_dtype, 4)
    with torch.inference_mode():
        reference = eager(eager_input(batch))
    # trace_backbone converts the module in place; keep the eager copy pristine for comparing.
    openvino_module = None
    if openvino:
        openvino_module = build_copy(eager, arch, fmt.build)
        if input_dtype == "uint8":
            openvino_module = _PixelInput(openvino_module).eval()
    scripted = trace_backbone(
        build_copy(eager, arch, fmt.build), optimization, channels_last, precision, input_dtype
    )

    repository = Path(repository)
    model_dir = repository / name / str(version)
    model_dir.mkdir(parents=True, exist_ok=True)
    model_path = model_dir / MODEL_FILENAME
    # Saving through a buffer names the archive "archive" instead of after the random temp
    # file name, so a fresh process exporting the same weights writes the same bytes.
    buffer = io.BytesIO()
    with quiet_torchscript_deprecation():
        torch.jit.save(scripted, buffer)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{MODEL_FILENAME}.", suffix=".tmp", dir=model_dir)
    tmp_model = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        del buffer
        os.chmod(tmp_model, 0o644)
        # Verify the bytes that will be served, before they replace anything.
        with quiet_torchscript_deprecation():
            loaded = torch.jit.load(str(tmp_model), map_location="cpu").eval()
        with torch.inference_mode():
            output = loaded(batch)
            abs_diff, rel_diff = compare_outputs(reference, output)
            single_abs, single_rel = compare_outputs(
                (reference[0][:1], reference[1][:1]), loaded(batch[:1])
            )
            cosine = min(min_cosine(reference[0], output[0]), 1.0)
        abs_diff, rel_diff = max(abs_diff, single_abs), max(rel_diff, single_rel)
        log.info(
            "TorchScript (%s, %s input) vs eager fp32 on %d inputs: max abs embedding diff "
            "%.3g, min cosine %.6f, max relative norm diff %.3g",
            precision,
            input_dtype,
            batch.shape[0],
            abs_diff,
            cosine,
            rel_diff,
        )
        if precision == "fp32" and not (abs_diff <= tolerance and rel_diff <= tolerance):
            raise ExportError(
                f"exported {arch} does not reproduce the eager model: max abs embedding diff "
                f"{abs_diff:.3g}, max relative norm diff {rel_diff:.3g} (tolerance {tolerance:g})"
            )
        if precision != "fp32" and not (
            cosine >= reduced_min_cosine and rel_diff <= REDUCED_MAX_REL_NORM_ERROR
        ):
            raise ExportError(
                f"exported {arch} in {precision} is too far from the fp32 eager model: min "
                f"cosine {cosine:.6f} (need >= {reduced_min_cosine}), max relative norm diff "
                f"{rel_diff:.3g} (need <= {REDUCED_MAX_REL_NORM_ERROR:g})"
            )
        model_sha = _sha256(tmp_model)
        os.replace(tmp_model, model_path)
    finally:
        tmp_model.unlink(missing_ok=True)

    metadata: dict[str, Any] = {
        "name": name,
        "version": version,
        "arch": arch,
        "embedding_dim": EMBEDDING_DIM,
        "input_name": INPUT_NAME,
        "input_dims": list(INPUT_DIMS),
        "embedding_name": EMBEDDING_NAME,
        "norm_name": NORM_NAME,
        "max_batch_size": max_batch_size,
        "format": fmt.name,
        "input": fmt.input_contract(),
        "input_dtype": input_dtype,
        "preprocessing": fmt.preprocessing(input_dtype),
        "weights": weights,
        "seed": seed if checkpoint_path is None else None,
        "checkpoint_file": checkpoint_path.name if checkpoint_path is not None else None,
        "checkpoint_sha256": checkpoint_sha,
        "model_sha256": model_sha,
        "optimization": optimization,
        "channels_last": channels_last,
        "precision": precision,
        "max_abs_diff": abs_diff,
        "max_rel_norm_diff": rel_diff,
        "min_cosine": cosine,
        "torch_version": torch.__version__,
        "exporter_version": EXPORTER_VERSION,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metadata_path = model_dir / METADATA_FILENAME
    atomic_write_bytes(metadata_path, (json.dumps(metadata, indent=2) + "\n").encode())
    # config.pbtxt last: a repository poller that sees it finds the version complete.
    config_path = repository / name / CONFIG_FILENAME
    atomic_write_bytes(config_path, config_text.encode())
    openvino_report = None
    if openvino_module is not None:
        from adaface_server.models.openvino_export import export_openvino

        openvino_report = export_openvino(
            openvino_module, repository, name, version, config_text, metadata, batch,
            reference, tolerance,
        )  # fmt: skip
        log.info(
            "OpenVINO IR (f32) vs eager fp32 on %d inputs: max abs embedding diff %.3g, max "
            "relative norm diff %.3g; wrote %s",
            batch.shape[0],
            openvino_report.max_abs_diff,
            openvino_report.max_rel_norm_diff,
            openvino_report.model_dir,
        )
    seconds = time.perf_counter() - started
    log.info(
        "exported %s (%s, %s weights) to %s in %.1f s", name, arch, weights, model_dir, seconds
    )
    return ExportReport(
        name=name,
        version=version,
        arch=arch,
        model_path=model_path,
        config_path=config_path,
        metadata_path=metadata_path,
        model_sha256=model_sha,
        max_abs_diff=abs_diff,
        max_rel_norm_diff=rel_diff,
        untrained=checkpoint_path is None,
        seconds=seconds,
        precision=precision,
        min_cosine=cosine,
        input_dtype=input_dtype,
        openvino=openvino_report,
    )


PYTHON_BACKEND_TEMPLATE = Path(__file__).resolve().with_name("triton_python_model.py")


def render_python_backend_config(config_text: str, threads: int = 0) -> str:
    """The python-backend twin's config.pbtxt: same tensors, batching and warm-up as
    config_text, served by Triton's python backend instead of libtorch."""
    config = parse_model_config(config_text)
    config.ClearField("platform")
    config.backend = "python"
    # INFERENCE_MODE is a libtorch-backend parameter; the twin always runs in inference mode.
    config.parameters.pop("INFERENCE_MODE", None)
    if threads:
        # The libtorch backend's name for the same knob, read by the twin's model.py.
        config.parameters["INTRA_OP_THREAD_COUNT"].string_value = str(threads)
    return format_model_config(config)


def export_python_backend(
    repository: Path | str,
    name: str,
    twin_repository: Path | str,
    *,
    version: int | None = None,
    threads: int = 0,
) -> Path:
    """Write a python-backend twin of repository/name into twin_repository/name.

    For Triton builds without the PyTorch backend (e.g. the tritonserver in nvidia-pytriton):
    same model name, tensor names, shapes, max_batch_size and dynamic batching; `model.py`
    (this package's triton_python_model.py) runs a copy of the exported model.pt and moves
    tensors by DLPack. Returns the twin's version directory.
    """
    source_root = Path(repository) / name
    spec = load_model_spec(repository, name)
    if version is not None and version != spec.version:
        spec_dir = source_root / str(version)
        if not (spec_dir / MODEL_FILENAME).is_file():
            raise ModelRepositoryError(f"{spec_dir / MODEL_FILENAME} does not exist")
    else:
        version = spec.version
        spec_dir = spec.model_dir
    config_text = (source_root / CONFIG_FILENAME).read_text()
    twin_root = Path(twin_repository) / name
    if twin_root.resolve() == source_root.resolve():
        raise ValueError("the python-backend twin needs its own repository directory")
    twin_dir = twin_root / str(version)
    twin_dir.mkdir(parents=True, exist_ok=True)
    for filename in (MODEL_FILENAME, METADATA_FILENAME):
        target = twin_dir / filename
        target.unlink(missing_ok=True)
        try:
            # A hard link shares the (large) weights file when both trees are on one disk.
            os.link(spec_dir / filename, target)
        except OSError:
            atomic_write_bytes(target, (spec_dir / filename).read_bytes())
    atomic_write_bytes(twin_dir / "model.py", PYTHON_BACKEND_TEMPLATE.read_bytes())
    config_path = twin_root / CONFIG_FILENAME
    atomic_write_bytes(config_path, render_python_backend_config(config_text, threads).encode())
    log.info("wrote python-backend twin of %s to %s", name, twin_root)
    return twin_dir


def build_copy(model: nn.Module, arch: str, build: Any = build_model) -> nn.Module:
    """A fresh arch instance (made by build) holding model's weights (cheaper than deepcopy)."""
    twin = build(arch)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.eval()


def _optional_path(text: str) -> Path | None:
    # "" means "no checkpoint", so a compose file can pass an unset variable through.
    return Path(text) if text else None


def existing_export_matches(
    repository: Path | str,
    name: str,
    version: int,
    arch: str,
    checkpoint: Path | None,
    seed: int = 0,
    model_format: str = "adaface",
    input_dtype: str = DEFAULT_INPUT_DTYPE,
    openvino: bool = False,
) -> bool:
    """True when repository/name/version already holds an export of these weights taking
    input_dtype (with openvino, and its OpenVINO IR twin of the same model file)."""
    model_dir = Path(repository) / name / str(version)
    try:
        metadata = json.loads((model_dir / METADATA_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    if not (model_dir / MODEL_FILENAME).is_file() or metadata.get("arch") != arch:
        return False
    # Exports made before formats were recorded are AdaFace ones.
    if metadata.get("format", "adaface") != model_format:
        return False
    if metadata.get("input_dtype", DEFAULT_INPUT_DTYPE) != input_dtype:
        return False
    if not (Path(repository) / name / CONFIG_FILENAME).is_file():
        return False
    if openvino and not _openvino_twin_matches(repository, name, version, metadata):
        return False
    if checkpoint is None:
        return metadata.get("weights") == WEIGHTS_RANDOM and metadata.get("seed") == seed
    try:
        return metadata.get("checkpoint_sha256") == _sha256(Path(checkpoint))
    except OSError:
        return False


def _openvino_twin_matches(
    repository: Path | str, name: str, version: int, metadata: dict[str, Any]
) -> bool:
    twin = Path(repository) / openvino_model_name(name)
    try:
        twin_metadata = json.loads((twin / str(version) / METADATA_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    files = (twin / CONFIG_FILENAME, twin / str(version) / OPENVINO_MODEL_FILENAME)
    return all(f.is_file() for f in files) and (
        twin_metadata.get("model_sha256") == metadata.get("model_sha256")
    )


def build_parser() -> argparse.ArgumentParser:
    """The adaface-export command line."""
    parser = argparse.ArgumentParser(
        prog="adaface-export",
        description="Export an AdaFace IR backbone to TorchScript + a Triton model repository.",
    )
    parser.add_argument(
        "--checkpoint",
        type=_optional_path,
        default=None,
        help="AdaFace .ckpt or backbone .pth (or, with --format arcface_torch, InsightFace's "
        "backbone.pth); omitted = RANDOM untrained weights (tests only)",
    )
    parser.add_argument(
        "--format",
        dest="model_format",
        choices=tuple(FORMATS),
        default="adaface",
        help="checkpoint family: adaface (IR nets, BGR input; default) or arcface_torch "
        "(InsightFace iresnet r18/r34/r50/r100, RGB input)",
    )
    parser.add_argument(
        "--arch",
        default=None,
        choices=tuple(a for f in FORMATS.values() for a in f.archs),
        help=f"adaface: {', '.join(ADAFACE.archs)} (default {DEFAULT_ARCH}); arcface_torch: "
        f"{', '.join(FORMATS['arcface_torch'].archs)} (default "
        f"{FORMATS['arcface_torch'].default_arch})",
    )
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--name", default=None, help="model name (default adaface_<arch>)")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE)
    parser.add_argument("--instance-count", type=int, default=1)
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US)
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    parser.add_argument(
        "--optimization",
        choices=OPTIMIZATIONS,
        default="freeze",
        help="none: plain trace; freeze: inline weights and fold conv+BN (default)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="weights and compute inside the model (outputs stay float32, the input is as "
        "--input-dtype says): fp32 "
        "(verified to 1e-5), bf16 or fp16 (verified: min cosine >= 0.999, relative norm "
        "error <= 1e-2 vs fp32)",
    )
    parser.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default=DEFAULT_INPUT_DTYPE,
        help="what INPUT__0 takes: fp32 = pixels normalised by the server, (x/255-0.5)/0.5 "
        "(default); uint8 = raw 0..255 pixels (same NCHW layout and channel order), "
        "normalised inside the model bit for bit as the server would: 37,632 instead of "
        "150,528 bytes per image to Triton (config TYPE_UINT8)",
    )
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when the repository already holds this export (same arch, same "
        "checkpoint or random seed): lets a compose init service run on every start",
    )
    parser.add_argument(
        "--python-backend",
        type=Path,
        default=None,
        metavar="TWIN_REPOSITORY",
        help="also write a Triton python-backend twin of the model into this repository "
        "(for Triton builds without the PyTorch backend)",
    )
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="also write the OpenVINO IR (fp32 weights, verified to 1e-5 vs eager) as the "
        "Triton model <name>_openvino (backend openvino: model.xml/model.bin), served by "
        "adaface-server --runtime openvino or Triton's OpenVINO backend; needs the openvino "
        "package",
    )
    parser.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep NCHW-contiguous convolutions",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = get_format(args.model_format)
    args.arch = args.arch or fmt.default_arch
    if args.arch not in fmt.archs:
        parser.error(
            f"argument --arch: {args.arch!r} is not a {fmt.name} arch "
            f"(choose from {', '.join(fmt.archs)})"
        )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    name = args.name or fmt.default_model_name(args.arch)
    if args.if_missing and existing_export_matches(
        args.repository,
        name,
        args.version,
        args.arch,
        args.checkpoint,
        args.seed,
        fmt.name,
        args.input_dtype,
        args.openvino,
    ):
        print(f"{args.repository / name / str(args.version)} already holds this export; skipped")
        return 0
    try:
        report = export_model(
            args.checkpoint,
            args.arch,
            args.repository,
            name,
            max_batch_size=args.max_batch_size,
            seed=args.seed,
            instance_count=args.instance_count,
            version=args.version,
            optimization=args.optimization,
            channels_last=args.channels_last,
            max_queue_delay_us=args.max_queue_delay_us,
            precision=args.precision,
            model_format=fmt.name,
            input_dtype=args.input_dtype,
            openvino=args.openvino,
        )
        if args.python_backend is not None:
            twin_dir = export_python_backend(
                args.repository, name, args.python_backend, version=args.version
            )
    except ExportError as error:
        print(f"adaface-export: verification failed: {error}", file=sys.stderr)
        return 1
    except (CheckpointError, ModelRepositoryError, ValueError, OSError) as error:
        print(f"adaface-export: error: {error}", file=sys.stderr)
        return 2
    print(f"model:        {report.model_path}")
    print(f"config:       {report.config_path}")
    print(f"metadata:     {report.metadata_path}")
    print(f"sha256:       {report.model_sha256}")
    if args.python_backend is not None:
        print(f"python twin:  {twin_dir}")
    print(f"max abs diff of embeddings (TorchScript vs eager): {report.max_abs_diff:.3g}")
    print(f"max rel diff of norms (TorchScript vs eager):      {report.max_rel_norm_diff:.3g}")
    print(f"min cosine of embeddings ({args.precision} vs eager fp32): {report.min_cosine:.6f}")
    if report.openvino is not None:
        print(f"openvino:     {report.openvino.xml_path} (Triton model {report.openvino.name})")
        print(
            f"max abs diff of embeddings (OpenVINO IR f32 vs eager): "
            f"{report.openvino.max_abs_diff:.3g}"
        )
    if report.untrained:
        print("WARNING: random untrained weights; embeddings are meaningless", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
