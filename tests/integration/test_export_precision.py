"""Reduced-precision exports (bf16, fp16): float32 in and out, verified against fp32, the
measured parity recorded in metadata.json, and checked here against upstream golden vectors."""

from __future__ import annotations

import json
import logging
import time

import grpc
import numpy as np
import pytest
import torch

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_server.backends.precision import parity
from adaface_server.models.export import ExportError, export_model

from .server_harness import ServerThread, server_settings

# The exporter's gate for reduced precision.
MIN_COSINE = 0.999
MAX_REL_NORM_ERROR = 1e-2


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def reduced_export(request, tmp_path_factory):
    # fp16 convolutions run on CPU in torch 2.13 (slowly), so the fp16 file is verified here;
    # its speed only matters on CUDA.
    repository = tmp_path_factory.mktemp(f"repo_{request.param}")
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    try:
        report = export_model(
            None, "ir_18", repository, f"ir18_{request.param}", max_batch_size=8,
            precision=request.param,
        )  # fmt: skip
    finally:
        logging.getLogger("adaface_server.export").setLevel(logging.NOTSET)
    return request.param, report


def test_metadata_records_the_measured_parity(reduced_export):
    precision, report = reduced_export
    metadata = json.loads(report.metadata_path.read_text())
    assert metadata["precision"] == precision
    assert MIN_COSINE <= metadata["min_cosine"] <= 1.0
    assert 0 < metadata["max_rel_norm_diff"] <= MAX_REL_NORM_ERROR
    assert metadata["max_abs_diff"] > 1e-5  # really reduced: fp32 would be within 1e-5
    assert (metadata["min_cosine"], metadata["max_rel_norm_diff"]) == (
        report.min_cosine, report.max_rel_norm_diff,
    )  # fmt: skip


def test_reduced_model_is_fp32_in_and_out_and_close_to_upstream(reduced_export, golden_ir18):
    _, report = reduced_export
    module = torch.jit.load(str(report.model_path), map_location="cpu").eval()
    with torch.inference_mode():
        emb, norms = module(golden_ir18["inputs"])
    assert emb.dtype == torch.float32 and norms.dtype == torch.float32
    assert tuple(emb.shape) == (3, 512) and tuple(norms.shape) == (3, 1)
    cos, rel = parity(
        (golden_ir18["embeddings"].numpy(), golden_ir18["norms"].numpy()),
        (emb.numpy(), norms.numpy()),
    )
    assert cos >= MIN_COSINE, cos
    assert rel <= MAX_REL_NORM_ERROR, rel
    np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, atol=1e-5)


def test_reduced_export_failing_its_gate_leaves_no_model(tmp_path):
    with pytest.raises(ExportError, match=r"in bf16 is too far from the fp32 eager model: min"):
        export_model(None, "ir_18", tmp_path, "strict", precision="bf16", reduced_min_cosine=1.01)
    assert not (tmp_path / "strict" / "1" / "model.pt").exists()
    assert not (tmp_path / "strict" / "config.pbtxt").exists()


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        export_model(None, "ir_18", tmp_path, "x", precision="int8")


def info(address: str) -> embedder_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        return stub.Info(embedder_pb2.InfoRequest(), timeout=30)


def test_server_runs_a_reduced_export_as_exported(reduced_export):
    precision_name, report = reduced_export
    repository = report.model_path.parents[2]
    server = ServerThread(server_settings(repository, report.name, precision="auto")).start()
    try:
        server.wait_serving()
        assert (info(server.address).device, info(server.address).precision) == (
            "cpu", precision_name,
        )  # fmt: skip
    finally:
        server.stop()
    # fp32 cannot be promised from a reduced export: refused, with the reason
    server = ServerThread(server_settings(repository, report.name, precision="fp32")).start()
    try:
        details = ""
        deadline = time.monotonic() + 120
        while "cannot be served" not in details and time.monotonic() < deadline:
            with pytest.raises(grpc.RpcError) as err:  # UNAVAILABLE while loading, then why
                info(server.address)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = err.value.details()
            time.sleep(0.2)
        assert f"was exported in {precision_name}: serve it with --precision auto" in details
    finally:
        server.stop()


def test_cli_precision_flag_writes_a_bf16_model(tmp_path, capsys):
    from adaface_server.models.export import main

    argv = ["--arch", "ir_18", "--repository", str(tmp_path), "--name", "cli_bf16",
            "--max-batch-size", "4", "--precision", "bf16"]  # fmt: skip
    assert main(argv) == 0
    assert "min cosine of embeddings (bf16 vs eager fp32): 0.99" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "cli_bf16" / "1" / "metadata.json").read_text())
    assert metadata["precision"] == "bf16" and metadata["min_cosine"] >= MIN_COSINE
