"""A uint8-input export (adaface-export --input-dtype uint8) served by a real tritonserver:
the Triton backend sends raw pixels and gets what the embedded backend gets from the fp32
export; unsupported or contradicting input datatypes are refused at start."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_server.errors import Internal
from adaface_server.models.export import export_python_backend

from .server_harness import ServerThread, running, server_settings
from .test_embed_rpc import crop
from .test_triton import NOT_SERVING, assert_golden_outputs, assert_same_embeddings
from .triton_harness import (
    TritonProcess,
    TritonUnavailable,
    find_tritonserver,
    missing_tritonserver,
)


def start_triton(repository, name, tmp_path, edit=None) -> TritonProcess:
    """A tritonserver serving the python-backend twin of repository/name (config edited)."""
    try:
        install = find_tritonserver()
    except TritonUnavailable as exc:
        missing_tritonserver(exc)
    twin = tmp_path / "twin"
    export_python_backend(repository, name, twin, threads=1)
    if edit is not None:
        config = twin / name / "config.pbtxt"
        config.write_text(edit(config.read_text()))
    return TritonProcess(twin, tmp_path / "triton.log", install).start()


@pytest.fixture(scope="module")
def triton_uint8(ir18_uint8_repository, tmp_path_factory):
    process = start_triton(*ir18_uint8_repository, tmp_path_factory.mktemp("triton_uint8"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def uint8_servers(ir18_repository, ir18_uint8_repository, triton_uint8):
    """(embedded server on the fp32 export, server -> Triton serving the uint8 export)."""
    with running(
        server_settings(*ir18_repository),
        server_settings(*ir18_uint8_repository, backend="triton", triton_url=triton_uint8.url),
    ) as servers:
        yield servers


def test_triton_serves_uint8_pixels_to_the_golden_vectors(triton_uint8, golden_ir18):
    """Triton directly (tritonclient): a UINT8 tensor of BGR pixels in, upstream vectors out."""
    x = golden_ir18["pixels"].numpy()
    tensor = triton_grpc.InferInput("INPUT__0", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    client = triton_grpc.InferenceServerClient(triton_uint8.url)
    try:
        (served_input,) = client.get_model_metadata("adaface_ir18").inputs
        result = client.infer("adaface_ir18", [tensor])
    finally:
        client.close()
    assert served_input.datatype == "UINT8"
    assert_golden_outputs(result, golden_ir18)


@pytest.mark.parametrize("flip", [False, True])
def test_triton_uint8_equals_embedded_fp32(uint8_servers, flip):
    embedded, remote = uint8_servers
    assert remote.app.embedding.backend.spec.input_dtype == "uint8"
    assert embedded.app.embedding.backend.spec.input_dtype == "fp32"
    assert_same_embeddings(embedded, remote, [crop(900 + s) for s in range(21)], flip)


def test_a_float_batch_for_a_uint8_input_is_internal(uint8_servers, caplog):
    """Floats cast to uint8 would be garbage embeddings: the backend refuses our own bug."""
    _, remote = uint8_servers
    backend = remote.app.embedding.backend
    with (
        caplog.at_level("ERROR", logger="adaface_server.backends.triton"),
        pytest.raises(Internal),
    ):
        remote.call(backend.infer(np.zeros((1, 3, 112, 112), np.float32)))
    assert "a float32 batch for the UINT8 input of adaface_ir18" in caplog.text
    emb, norms = remote.call(backend.infer(np.zeros((2, 3, 112, 112), np.uint8)))
    assert emb.shape == (2, 512) and norms.shape == (2, 1)


def refusal(server: ServerThread) -> grpc.RpcError:
    """The UNAVAILABLE "cannot be served" error Info gives once the start-up check failed."""
    with grpc.insecure_channel(server.address) as channel:
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        deadline = time.monotonic() + 30
        while True:
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(embedder_pb2.InfoRequest(), timeout=10)
            if "cannot be served" in err.value.details() or time.monotonic() > deadline:
                return err.value
            time.sleep(0.1)


def test_local_fp32_metadata_contradicting_a_uint8_triton_model_is_refused(
    ir18_repository, triton_uint8
):
    server = ServerThread(
        server_settings(*ir18_repository, backend="triton", triton_url=triton_uint8.url)
    ).start()
    try:
        err = refusal(server)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            "input INPUT__0 is UINT8 but the local metadata.json says input_dtype 'fp32'"
            in err.details()
        )
        assert server.health() == NOT_SERVING
    finally:
        server.stop()


def test_an_input_datatype_the_server_cannot_send_is_refused_at_start(
    ir18_uint8_repository, tmp_path
):
    """Triton serves INPUT__0 as FP16: the server names the datatype and the exporter flag."""
    triton = start_triton(
        *ir18_uint8_repository, tmp_path, edit=lambda text: text.replace("TYPE_UINT8", "TYPE_FP16")
    )
    server = ServerThread(
        server_settings(*ir18_uint8_repository, backend="triton", triton_url=triton.url)
    ).start()
    try:
        err = refusal(server)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            f"model 'adaface_ir18' on Triton at {triton.url} does not match what this server "
            "sends and expects: input INPUT__0 is FP16, expected FP32 or UINT8 "
            "(adaface-export --input-dtype fp32|uint8)"
        ) in err.details()
        assert server.health() == NOT_SERVING
    finally:
        server.stop()
        triton.stop()
