"""OpenVINO: adaface-export --openvino writes the Triton OpenVINO-backend layout and passes its
gate; the IR reproduces the golden vectors in fp32 and passes the bf16 gate; a real server
with --runtime openvino serves what the TorchScript server serves and says so in Info.

Our bundled tritonserver has only the python backend, so the IR is run here with the
OpenVINO runtime (what --runtime openvino uses), not through Triton."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from adaface_server.backends import precision
from adaface_server.backends.base import embedded_runtime
from adaface_server.backends.openvino import OpenVINORunner, cpu_supports_bf16
from adaface_server.config import Settings, parse_settings
from adaface_server.models.export import TOLERANCE, existing_export_matches, export_model
from adaface_server.models.openvino_export import compile_ir
from adaface_server.models.repository import (
    CONFIG_FILENAME,
    METADATA_FILENAME,
    load_model_spec,
    parse_model_config,
)

from .server_harness import ServerThread, server_settings
from .test_precision import embed_golden, info, load_failure

pytest.importorskip("openvino", reason="make venv installs openvino (the [openvino] extra)")

NAME = "adaface_ir18"
TWIN = "adaface_ir18_openvino"
#: Measured: the IR in f32 is within 3e-7 of upstream's golden embeddings; held to the same
#: 1e-4 (embeddings) and 1e-5 relative (norms) as the fp32 TorchScript file.
GOLDEN_ATOL = 1e-4
GOLDEN_NORM_RTOL = 1e-5
GATE_MIN_COSINE = precision.GATE_MIN_COSINE
MAX_REL_NORM_ERROR = 1e-2  # a reduced precision's norm error, as the exporter's gate allows


def _export(tmp_path_factory, input_dtype: str):
    repository = tmp_path_factory.mktemp(f"openvino_{input_dtype}")
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    try:
        report = export_model(
            None, "ir_18", repository, NAME, max_batch_size=16, seed=0,
            input_dtype=input_dtype, openvino=True,
        )  # fmt: skip
    finally:
        logging.getLogger("adaface_server.export").setLevel(logging.NOTSET)
    return repository, report


@pytest.fixture(scope="module")
def ov_export(tmp_path_factory):
    """(repository, report): seed-0 ir_18 (golden_ir18's weights) exported with --openvino."""
    return _export(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def ov_uint8_export(tmp_path_factory):
    return _export(tmp_path_factory, "uint8")


def needs_bf16() -> None:
    if not (precision.cpu_supports_bf16() and cpu_supports_bf16()):
        pytest.skip("this CPU has no native bf16 kernels")


@pytest.mark.parametrize("dtype", ["fp32", "uint8"])
def test_export_writes_the_triton_openvino_layout(dtype, ov_export, ov_uint8_export):
    repository, report = ov_export if dtype == "fp32" else ov_uint8_export
    assert report.openvino is not None
    twin = repository / TWIN
    for path in ("1/model.xml", "1/model.bin", "1/metadata.json", CONFIG_FILENAME):
        assert (twin / path).is_file(), path
    source = parse_model_config((repository / NAME / CONFIG_FILENAME).read_text())
    config = parse_model_config((twin / CONFIG_FILENAME).read_text())
    assert (config.name, config.backend, config.platform) == (TWIN, "openvino", "")
    assert config.max_batch_size == source.max_batch_size == 16
    assert list(config.input) == list(source.input)
    assert list(config.output) == list(source.output)
    assert config.dynamic_batching == source.dynamic_batching
    assert [g.kind for g in config.instance_group] == [config.instance_group[0].KIND_CPU]
    assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    assert "INFERENCE_MODE" not in config.parameters  # libtorch-only

    source_meta = json.loads((repository / NAME / "1" / METADATA_FILENAME).read_text())
    meta = json.loads((twin / "1" / METADATA_FILENAME).read_text())
    assert meta["runtime"] == "openvino" and meta["source_model"] == NAME
    assert meta["precision"] == "fp32" and meta["input_dtype"] == dtype
    # The model's identity stays the weights' TorchScript file: galleries keep working.
    assert meta["model_sha256"] == source_meta["model_sha256"]
    assert len(meta["ir_sha256"]) == 64
    # The exporter's gate: the IR (f32) within the fp32 TorchScript tolerance of eager.
    assert meta["max_abs_diff"] <= TOLERANCE and meta["max_rel_norm_diff"] <= TOLERANCE
    assert report.openvino.max_abs_diff == meta["max_abs_diff"]

    spec = load_model_spec(repository, TWIN)
    assert spec.runtime == "openvino" and spec.model_path == twin / "1" / "model.xml"
    assert spec.input_dtype == dtype and spec.checksum == source_meta["model_sha256"]
    assert existing_export_matches(repository, NAME, 1, "ir_18", None, 0, "adaface", dtype, True)


def test_if_missing_reexports_without_the_twin(ir18_repository):
    repository, name = ir18_repository
    assert existing_export_matches(repository, name, 1, "ir_18", None, 0)
    assert not existing_export_matches(repository, name, 1, "ir_18", None, 0, openvino=True)


@pytest.mark.parametrize("dtype", ["fp32", "uint8"])
def test_fp32_ir_reproduces_upstream_golden_vectors(dtype, ov_export, ov_uint8_export, golden_ir18):
    repository, _ = ov_export if dtype == "fp32" else ov_uint8_export
    runner = OpenVINORunner(compile_ir(repository / TWIN / "1" / "model.xml", "fp32", 1), "fp32")
    inputs = golden_ir18["pixels" if dtype == "uint8" else "inputs"].numpy()
    emb, norms = runner(inputs)
    assert emb.dtype == np.float32 and norms.dtype == np.float32
    np.testing.assert_allclose(emb, golden_ir18["embeddings"].numpy(), atol=GOLDEN_ATOL, rtol=0)
    np.testing.assert_allclose(norms, golden_ir18["norms"].numpy(), rtol=GOLDEN_NORM_RTOL)


def test_bf16_ir_passes_the_gate_and_matches_fp32(ov_export, golden_ir18):
    needs_bf16()
    repository, _ = ov_export
    xml = repository / TWIN / "1" / "model.xml"
    runners = {p: OpenVINORunner(compile_ir(xml, p, 1), p) for p in ("fp32", "bf16")}
    batch = precision.verification_inputs(8)
    chosen, trials = precision.gate(runners, "bf16", batch, "cpu (OpenVINO)")
    assert chosen == "bf16" and trials[1].passed, trials
    emb, norms = runners["bf16"](golden_ir18["inputs"].numpy())
    expected = (golden_ir18["embeddings"].numpy(), golden_ir18["norms"].numpy())
    cos, rel = precision.parity(expected, (emb, norms))
    assert cos >= GATE_MIN_COSINE, cos
    assert rel <= MAX_REL_NORM_ERROR, rel
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)  # re-normalised
    assert np.abs(emb - expected[0]).max() > 1e-5  # it really ran in bf16


def test_auto_runtime_follows_the_ir(ov_export, ir18_repository):
    repository, _ = ov_export
    with_ir = Settings(model_repository=repository, model=NAME, device="cpu")
    assert embedded_runtime(with_ir) == "openvino"
    assert embedded_runtime(with_ir.replace(model=TWIN)) == "openvino"
    assert embedded_runtime(with_ir.replace(runtime="torchscript")) == "torchscript"
    plain, name = ir18_repository
    assert embedded_runtime(Settings(model_repository=plain, model=name)) == "torchscript"


def test_runtime_settings_are_validated():
    with pytest.raises(SystemExit):
        parse_settings(["--runtime", "onnx"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--runtime", "openvino", "--backend", "triton"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--runtime", "openvino", "--device", "cuda"], env={})
    assert parse_settings(["--runtime", "openvino"], env={}).runtime == "openvino"


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
def test_server_on_openvino_serves_what_torchscript_serves(requested, ov_export, golden_ir18):
    if requested == "bf16":
        needs_bf16()
    repository, _ = ov_export
    servers = {
        runtime: ServerThread(
            server_settings(repository, NAME, runtime=runtime, precision=requested, device="cpu")
        ).start()
        for runtime in ("openvino", "torchscript")
    }
    try:
        replies, vectors = {}, {}
        for runtime, server in servers.items():
            server.wait_serving()
            replies[runtime] = info(server.address)
            vectors[runtime] = embed_golden(server.address, golden_ir18)
    finally:
        for server in servers.values():
            server.stop()
    ov, ts = replies["openvino"], replies["torchscript"]
    assert (ov.backend, ov.device, ov.precision) == ("openvino", "cpu", requested)
    assert (ts.backend, ts.precision) == ("torchscript", requested)
    assert ov.model_name == TWIN and ov.model_checksum == ts.model_checksum
    assert ov.max_batch_size == ts.max_batch_size
    if requested == "fp32":
        np.testing.assert_allclose(vectors["openvino"], vectors["torchscript"], atol=1e-5)
        expected = golden_ir18["embeddings"].numpy()
        np.testing.assert_allclose(vectors["openvino"], expected, atol=GOLDEN_ATOL)
    else:
        cos = (vectors["openvino"] * vectors["torchscript"]).sum(1).min()
        assert cos >= GATE_MIN_COSINE, cos


def test_runtime_openvino_without_an_ir_fails_at_start(ir18_repository):
    repository, name = ir18_repository
    settings = server_settings(repository, name, runtime="openvino", device="cpu")
    server = ServerThread(settings).start()
    try:
        message = load_failure(server.address)
    finally:
        server.stop()
    assert "adaface-export --openvino" in message and f"{name}_openvino" in message
