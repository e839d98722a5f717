"""Each precision of the embedded backend against the upstream fp32 golden vectors, and what
a real server reports (Info, health) for fp32, bf16 and auto."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest
import torch

from adaface.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc
from adaface_server.backends import precision
from adaface_server.backends.precision import GATE_MIN_COSINE, ModelRunner

from .server_harness import ServerThread, server_settings

#: Model output quality signal: relative norm error a reduced precision may add (exporter gate).
MAX_REL_NORM_ERROR = 1e-2


def load_ir18(ir18_repository) -> torch.jit.ScriptModule:
    repository, name = ir18_repository
    return torch.jit.load(str(repository / name / "1" / "model.pt"), map_location="cpu").eval()


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_cpu_precisions_against_upstream_golden_vectors(name, ir18_repository, golden_ir18):
    runner = ModelRunner(load_ir18(ir18_repository), torch.device("cpu"), name, 16)
    emb, norms = runner(golden_ir18["inputs"].numpy())
    assert emb.dtype == np.float32 and norms.dtype == np.float32  # fp32 out, always
    expected_emb = golden_ir18["embeddings"].numpy()
    expected_norms = golden_ir18["norms"].numpy()
    if name == "fp32":
        np.testing.assert_allclose(emb, expected_emb, atol=1e-4, rtol=0)
        np.testing.assert_allclose(norms, expected_norms, rtol=1e-5)
    else:
        cos, rel = precision.parity((expected_emb, expected_norms), (emb, norms))
        assert cos >= GATE_MIN_COSINE, cos
        assert rel <= MAX_REL_NORM_ERROR, rel
        # and it really ran in reduced precision: not bit-identical to fp32
        assert np.abs(emb - expected_emb).max() > 1e-5


def test_auto_selection_follows_its_rule(ir18_repository, caplog):
    caplog.set_level(logging.INFO, logger="adaface_server.backends.precision")
    cpu = torch.device("cpu")
    selection = precision.select_runner(load_ir18(ir18_repository), cpu, "auto", 16)
    tried = [t.precision for t in selection.trials]
    assert tried == ["fp32", *precision.reduced_precisions(cpu)]
    assert selection.precision == precision.choose("auto", selection.trials)
    for trial in selection.trials[1:]:
        assert trial.passed, trial  # bf16 on random ir_18 is well inside the gate
    assert f"precision auto on cpu -> {selection.precision}" in caplog.text
    if len(tried) > 1:
        assert "parity gate bf16 vs fp32 on cpu: min cosine" in caplog.text


def info(address: str) -> embedder_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest(), timeout=30)


def embed_golden(address: str, golden) -> np.ndarray:
    inputs = golden["inputs"].numpy()
    # back to the RGB uint8 crops the golden PNGs hold
    rgb = np.rint((inputs.transpose(0, 2, 3, 1)[..., ::-1] * 0.5 + 0.5) * 255).astype(np.uint8)
    images = [
        common_pb2.ImageInput(
            raw=common_pb2.RawImage(data=img.tobytes(), height=112, width=112),
            alignment=common_pb2.ALIGNMENT_ALIGNED,
        )
        for img in rgb
    ]
    with grpc.insecure_channel(address) as channel:
        response = embedder_pb2_grpc.EmbedderStub(channel).Embed(
            embedder_pb2.EmbedRequest(images=images), timeout=60
        )
    return np.stack([np.frombuffer(r.embedding.vector, "<f4") for r in response.results])


@pytest.mark.parametrize("requested", ["bf16", "auto"])
def test_server_reports_and_serves_its_precision(requested, ir18_repository, golden_ir18):
    repository, name = ir18_repository
    settings = server_settings(repository, name, precision=requested, device="cpu")
    server = ServerThread(settings).start()
    if requested == "bf16" and not precision.cpu_supports_bf16():
        try:  # a CPU without native bf16 kernels refuses it, with the reason
            assert "--precision bf16 is not supported on cpu" in load_failure(server.address)
        finally:
            server.stop()
        return
    try:
        server.wait_serving()
        reply = info(server.address)
        assert reply.device == "cpu"
        assert reply.worker_pid > 0
        if requested == "bf16":
            assert reply.precision == "bf16"
        else:
            assert reply.precision in ("fp32", *precision.reduced_precisions(torch.device("cpu")))
        emb = embed_golden(server.address, golden_ir18)
        expected = golden_ir18["embeddings"].numpy()
        cos = (emb * expected).sum(1).min()
        if reply.precision == "fp32":
            np.testing.assert_allclose(emb, expected, atol=1e-4, rtol=0)
        else:
            assert cos >= GATE_MIN_COSINE
    finally:
        server.stop()


def test_fp32_pinned_server_reports_fp32(embed_server):
    reply = info(embed_server.address)
    assert (reply.device, reply.precision) == ("cpu", "fp32")


def load_failure(address: str, timeout: float = 120.0) -> str:
    """Info's UNAVAILABLE details once loading has failed (not merely "loading")."""
    deadline = time.monotonic() + timeout
    details = ""
    while time.monotonic() < deadline:
        try:
            info(address)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            details = exc.details()
            if "cannot be served" in details:
                return details
        time.sleep(0.2)
    raise AssertionError(f"loading did not fail within {timeout}s: {details!r}")


def test_fp16_on_cpu_is_refused_and_health_stays_not_serving(ir18_repository):
    repository, name = ir18_repository
    settings = server_settings(repository, name, precision="fp16", device="cpu")
    server = ServerThread(settings).start()
    try:
        assert "fp16 needs a CUDA device" in load_failure(server.address)
        with pytest.raises(TimeoutError):
            server.wait_serving(timeout=2)
    finally:
        server.stop()
