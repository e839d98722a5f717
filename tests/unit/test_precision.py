"""Device and precision resolution, the parity measure and the `auto` decision rule."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from adaface_server.backends import precision
from adaface_server.backends.precision import GATE_MIN_COSINE, PrecisionError, Trial, choose
from adaface_server.config import parse_settings

FP32 = Trial("fp32", 1.0, 0.0, 0.100)


def test_auto_takes_a_faster_reduced_precision_that_passes():
    assert choose("auto", [FP32, Trial("bf16", 0.99990, 3e-3, 0.050)]) == "bf16"


def test_auto_falls_back_to_fp32_when_the_gate_fails():
    assert choose("auto", [FP32, Trial("bf16", GATE_MIN_COSINE - 1e-4, 3e-3, 0.050)]) == "fp32"


def test_auto_keeps_fp32_when_reduced_precision_is_not_clearly_faster():
    # e.g. autocast bf16 on a CPU without native bf16 kernels
    assert choose("auto", [FP32, Trial("bf16", 0.99999, 1e-3, 0.095)]) == "fp32"


def test_auto_picks_the_fastest_passing_precision():
    trials = [FP32, Trial("fp16", 0.999999, 1e-4, 0.030), Trial("bf16", 0.9999, 2e-3, 0.020)]
    assert choose("auto", trials) == "bf16"
    trials[2] = Trial("bf16", 0.9990, 2e-3, 0.020)  # fastest, but fails the gate
    assert choose("auto", trials) == "fp16"


def test_explicit_reduced_precision_must_pass_the_gate():
    assert choose("bf16", [FP32, Trial("bf16", 0.9999, 3e-3, 0.2)]) == "bf16"
    with pytest.raises(PrecisionError, match=r"bf16 failed the parity gate: min cosine"):
        choose("bf16", [FP32, Trial("bf16", 0.99, 3e-3, 0.05)])


def test_gate_times_on_the_timing_batch_and_compares_on_the_verification_batch():
    """On CUDA `auto` times full batches (launch-bound batches of 8 would hide the gain):
    parity still comes from the verification batch, the speed from the timing batch."""
    seen: dict[str, set[int]] = {"fp32": set(), "fp16": set()}

    def runner(name: str, seconds_per_row: float):
        def run(batch: np.ndarray):
            seen[name].add(len(batch))
            if len(batch) == 64:
                time.sleep(seconds_per_row * 64)
            rows = 1 + np.eye(len(batch), 4, dtype=np.float32) + (0.0 if name == "fp32" else 1e-4)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            return rows, np.ones((len(batch), 1), np.float32)

        return run

    runners = {"fp32": runner("fp32", 2e-4), "fp16": runner("fp16", 5e-5)}
    batch, timing = np.zeros((8, 1)), np.zeros((64, 1))
    chosen, trials = precision.gate(runners, "auto", batch, "cuda:0", 1, timing)
    assert chosen == "fp16" and seen == {"fp32": {8, 64}, "fp16": {8, 64}}
    assert trials[1].min_cosine > 0.9999 and trials[1].seconds_per_batch < 0.5 * (
        trials[0].seconds_per_batch
    )


def test_parity_measures_cosine_and_relative_norm_error():
    emb = np.eye(2, 4, dtype=np.float32)
    tilted = np.array([[1, 0.1, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    tilted /= np.linalg.norm(tilted, axis=1, keepdims=True)
    cos, rel = precision.parity((emb, np.array([[2.0], [4.0]])), (tilted, np.array([[2.0], [4.2]])))
    assert cos == pytest.approx(1 / np.sqrt(1.01), rel=1e-6)
    assert rel == pytest.approx(0.05, rel=1e-6)


def test_cpu_device_and_unsupported_requests():
    assert precision.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device"):
        precision.check_supported(torch.device("cpu"), "fp16")
    expected = ["bf16"] if precision.cpu_supports_bf16() else []
    assert precision.reduced_precisions(torch.device("cpu")) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_auto_device_is_cpu_without_cuda_and_cuda_is_refused():
    assert precision.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PrecisionError, match="no CUDA device"):
        precision.resolve_device("cuda:0")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_device_is_cuda_when_present():
    assert precision.resolve_device("auto").type == "cuda"
    assert precision.reduced_precisions(torch.device("cuda"))[0] == "fp16"
    with pytest.raises(PrecisionError, match="CUDA device"):
        precision.resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_settings_accept_and_refuse_devices_and_precisions(capsys):
    settings = parse_settings(["--device", "cuda:1", "--precision", "bf16"], env={})
    assert (settings.device, settings.precision) == ("cuda:1", "bf16")
    defaults = parse_settings([], env={"ADAFACE_PRECISION": "fp32"})
    assert (defaults.device, defaults.precision) == ("auto", "fp32")
    for argv in (["--device", "gpu"], ["--device", "cuda:x"], ["--precision", "int8"]):
        with pytest.raises(SystemExit):
            parse_settings(argv, env={})
    assert "--precision must be auto, fp32, bf16 or fp16, got 'int8'" in capsys.readouterr().err


def test_reduced_precision_embeddings_are_unit_length(ir18_repository, golden_ir18):
    """Autocast runs the model's L2 normalisation in bf16 too; the runner restores unit length
    in fp32 (up to 0.25% off before, on a Xeon with AMX) and keeps the direction."""
    repository, name = ir18_repository
    module = torch.jit.load(str(repository / name / "1" / "model.pt"))
    runner = precision.ModelRunner(module, torch.device("cpu"), "bf16", max_batch_size=8)
    embeddings, norms = runner(golden_ir18["inputs"].numpy())
    assert embeddings.dtype == np.float32 and norms.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6, rtol=0)
    cosine = (embeddings * golden_ir18["embeddings"].numpy()).sum(1)
    assert cosine.min() >= GATE_MIN_COSINE, cosine


def test_detector_follows_the_model_device_and_runs_fp32_on_cpu():
    cpu = torch.device("cpu")
    place = precision.DetectorPlacement
    assert precision.detector_placement("auto", "auto", "cpu") == place(cpu, "fp32", "torch")
    assert precision.detector_placement("cpu", "fp32", "auto") == place(cpu, "fp32", "torch")
    # auto: OpenVINO on the CPU (make venv installs it), torch where it runs elsewhere
    assert precision.detector_placement("cpu", "auto", "cpu", "auto") == place(
        cpu, "fp32", "openvino"
    )
    with pytest.raises(PrecisionError, match="--detect-precision fp16 needs a CUDA device"):
        precision.detector_placement("cpu", "fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_detector_on_cuda_is_refused_without_cuda():
    with pytest.raises(PrecisionError, match="--detect-device cuda: no CUDA device"):
        precision.detector_placement("cuda", "auto", "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detector_runs_fp16_on_cuda_by_default():
    place = precision.detector_placement("auto", "auto", "auto", "auto")
    assert place == precision.DetectorPlacement(torch.device("cuda", 0), "fp16", "torch")
    with pytest.raises(PrecisionError, match="--detect-runtime openvino runs on the CPU"):
        precision.detector_placement("cuda", "auto", "auto", "openvino")
