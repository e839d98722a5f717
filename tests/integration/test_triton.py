"""The Triton backend against a real tritonserver: equality with the embedded backend, the
python-backend twin, start-up checks, errors, and Triton dying and coming back."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from google.protobuf import text_format
from grpc_health.v1 import health_pb2

from adaface.v1 import embedder_pb2, embedder_pb2_grpc
from adaface_server.errors import DeadlineExceeded, Internal
from adaface_server.models.export import existing_export_matches, export_python_backend
from adaface_server.models.export import main as export_main
from adaface_server.models.repository import load_model_spec, read_model_config
from adaface_server.request_context import Call, current_call

from .server_harness import ServerThread, running, server_settings
from .test_embed_rpc import aligned, crop, vectors
from .triton_harness import TritonProcess, find_tritonserver, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_health(server: ServerThread, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.health() == status:
            return
        time.sleep(0.05)
    raise AssertionError(f"health did not become {status} within {timeout}s")


def embed(stub, crops, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    request = embedder_pb2.EmbedRequest(
        images=[aligned(c) for c in crops], options=embedder_pb2.EmbedOptions(flip_fusion=flip)
    )
    return vectors(stub.Embed(request, timeout=60))


@pytest.fixture(scope="module")
def both_servers(ir18_repository, triton):
    """(embedded, triton-backed) servers on the same exported model."""
    repository, name = ir18_repository
    with running(
        server_settings(repository, name),
        server_settings(repository, name, backend="triton", triton_url=triton.url),
    ) as servers:
        yield servers


# -- the exporter's python-backend twin --------------------------------------------------


def test_python_backend_twin_mirrors_the_libtorch_entry(ir18_repository, tmp_path):
    repository, name = ir18_repository
    twin_dir = export_python_backend(repository, name, tmp_path, threads=2)
    source = read_model_config(repository / name / "config.pbtxt")
    twin = read_model_config(tmp_path / name / "config.pbtxt")
    assert (source.platform, source.backend) == ("pytorch_libtorch", "")
    assert (twin.platform, twin.backend) == ("", "python")
    assert twin.name == source.name == name
    assert twin.max_batch_size == source.max_batch_size
    assert list(twin.input) == list(source.input) and list(twin.output) == list(source.output)
    assert twin.dynamic_batching == source.dynamic_batching
    assert list(twin.model_warmup) == list(source.model_warmup)
    assert twin.parameters["INTRA_OP_THREAD_COUNT"].string_value == "2"
    assert "INFERENCE_MODE" not in twin.parameters
    assert (twin_dir / "model.pt").read_bytes() == (
        repository / name / "1" / "model.pt"
    ).read_bytes()
    assert "to_dlpack" in (twin_dir / "model.py").read_text()
    # The twin is itself a valid repository entry for the embedded backend.
    assert load_model_spec(tmp_path, name).checksum == load_model_spec(repository, name).checksum


def test_export_cli_writes_the_twin(tmp_path, capsys):
    status = export_main(
        [
            "--arch", "ir_18", "--repository", str(tmp_path / "repo"), "--name", "m",
            "--max-batch-size", "4", "--python-backend", str(tmp_path / "twin"),
        ]
    )  # fmt: skip
    assert status == 0
    assert "python twin:" in capsys.readouterr().out
    config = text_format.MessageToString(
        read_model_config(tmp_path / "twin" / "m" / "config.pbtxt")
    )
    assert 'backend: "python"' in config and "max_batch_size: 4" in config
    assert (tmp_path / "twin" / "m" / "1" / "model.py").is_file()
    # --if-missing (compose's export service runs on every `up`): same export -> no-op.
    argv = ["--arch", "ir_18", "--repository", str(tmp_path / "repo"), "--name", "m"]
    assert export_main([*argv, "--if-missing", "--checkpoint", ""]) == 0
    assert "already holds this export; skipped" in capsys.readouterr().out
    repo = tmp_path / "repo"
    assert existing_export_matches(repo, "m", 1, "ir_18", None, seed=0)
    assert not existing_export_matches(repo, "m", 1, "ir_18", None, seed=1)
    assert not existing_export_matches(repo, "m", 1, "ir_34", None, seed=0)
    assert not existing_export_matches(repo, "m", 1, "ir_18", repo / "m" / "1" / "model.pt")


def test_triton_serves_the_golden_vectors(triton, golden_ir18):
    """Triton directly (tritonclient, no adaface-server): the upstream reference vectors."""
    x = golden_ir18["inputs"].numpy()
    tensor = triton_grpc.InferInput("INPUT__0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client = triton_grpc.InferenceServerClient(triton.url)
    try:
        result = client.infer("adaface_ir18", [tensor])
    finally:
        client.close()
    assert_golden_outputs(result, golden_ir18)


def assert_golden_outputs(result, golden) -> None:
    """A tritonclient result against the golden vectors: embeddings 1e-5, norms rtol 1e-5."""
    embedding = torch.from_numpy(result.as_numpy("OUTPUT__0").copy())
    assert (embedding - golden["embeddings"]).abs().max().item() <= 1e-5
    torch.testing.assert_close(
        torch.from_numpy(result.as_numpy("OUTPUT__1").copy()),
        golden["norms"],
        rtol=1e-5,
        atol=0,
    )


# -- equality with the embedded backend ----------------------------------------------------


@pytest.mark.parametrize("flip", [False, True])
def test_triton_backend_equals_embedded_backend(both_servers, flip):
    embedded, remote = both_servers
    assert_same_embeddings(embedded, remote, [crop(100 + s) for s in range(21)], flip)


def assert_same_embeddings(embedded, remote, crops, flip: bool) -> None:
    """Both servers embed `crops` alike: vectors within 1e-5, norms rtol 1e-5. More crops than
    max_batch_size send several concurrent chunks."""
    with (
        grpc.insecure_channel(embedded.address) as a,
        grpc.insecure_channel(remote.address) as b,
    ):
        local = embed(embedder_pb2_grpc.EmbedderStub(a), crops, flip)
        via_triton = embed(embedder_pb2_grpc.EmbedderStub(b), crops, flip)
    assert np.abs(local[0] - via_triton[0]).max() <= 1e-5
    np.testing.assert_allclose(local[1], via_triton[1], rtol=1e-5)


def test_info_on_triton_reports_the_local_model_identity(both_servers, ir18_repository):
    _, remote = both_servers
    with grpc.insecure_channel(remote.address) as channel:
        info = embedder_pb2_grpc.EmbedderStub(channel).Info(embedder_pb2.InfoRequest())
    spec = load_model_spec(*ir18_repository)
    assert info.backend == "triton"
    assert info.model_checksum == spec.checksum and info.arch == "ir_18"
    assert info.max_batch_size == spec.max_batch_size


def test_concurrent_requests_are_batched_by_triton(both_servers, triton):
    """The server sends concurrent calls; Triton's dynamic batcher merges them."""
    _, remote = both_servers
    client = triton_grpc.InferenceServerClient(triton.url)

    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics("adaface_ir18").model_stats[0]
        return stats.inference_count, stats.execution_count

    try:
        before = counts()
        with grpc.insecure_channel(remote.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            requests = [
                embedder_pb2.EmbedRequest(images=[aligned(crop(200 + i))]) for i in range(24)
            ]
            futures = [stub.Embed.future(r, timeout=60) for r in requests]
            assert all(len(f.result().results) == 1 for f in futures)
        # Triton updates its statistics just after answering: wait for the 24 to land.
        deadline = time.monotonic() + 10
        while (after := counts())[0] - before[0] < 24 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
    assert after[0] - before[0] == 24
    assert after[1] - before[1] < 24  # at least two requests shared one forward pass


def test_a_tensor_triton_rejects_is_internal_not_the_callers_fault(both_servers, caplog):
    _, remote = both_servers
    backend = remote.app.embedding.backend
    wrong = np.zeros((1, 3, 100, 100), np.float32)  # a bug on our side, e.g. a bad crop size
    with (
        caplog.at_level("ERROR", logger="adaface_server.backends.triton"),
        pytest.raises(Internal) as err,
    ):
        remote.call(backend.infer(wrong))
    assert str(err.value) == "internal error: the model backend rejected the request"
    assert "rejected a batch of 1 rows" in caplog.text and "INPUT__0" in caplog.text
    assert remote.health() == SERVING  # Triton is fine; nothing to mark down


def test_calls_to_triton_never_outlive_the_callers_deadline(both_servers):
    """The Triton call's timeout is the caller's remaining time, and running out of it is
    the caller's DEADLINE_EXCEEDED, not an UNAVAILABLE Triton."""
    _, remote = both_servers
    backend = remote.app.embedding.backend
    batch = np.zeros((2, 3, 112, 112), np.float32)

    async def infer_with(remaining: float) -> BaseException | None:
        started = time.monotonic()
        current_call.set(Call("/test", "id", started, deadline=started + remaining))
        try:
            await backend.infer(batch)
        except BaseException as exc:
            return exc
        return None

    # Nothing left: refused before Triton is asked.
    assert isinstance(remote.call(infer_with(-1.0)), DeadlineExceeded)
    # 1 ms left (the triton_timeout_seconds default is 30 s): Triton's deadline fires.
    err = remote.call(infer_with(0.001))
    assert isinstance(err, DeadlineExceeded) and "waiting for Triton" in str(err), err
    assert backend.ready()  # the caller ran out of time; Triton is fine
    assert remote.call(infer_with(30.0)) is None


def test_overload_is_resource_exhausted_naming_the_limit(ir18_repository, triton):
    """Triton batches, so the server bounds the images in flight to it by --max-queue."""
    repository, name = ir18_repository
    settings = server_settings(
        repository, name, backend="triton", triton_url=triton.url, max_queue=4
    )
    server = ServerThread(settings).start().wait_serving()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            request = embedder_pb2.EmbedRequest(images=[aligned(crop(500 + i)) for i in range(3)])
            futures = [stub.Embed.future(request, timeout=60) for _ in range(12)]
            errors = []
            for future in futures:
                try:
                    future.result()
                except grpc.RpcError as exc:
                    errors.append(exc)
    finally:
        server.stop()
    assert len(errors) < len(futures)
    for exc in errors:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "would exceed the queue limit of 4 (max_queue)" in exc.details()
        assert f"in flight to Triton at {triton.url}" in exc.details()


# -- start-up checks ---------------------------------------------------------------------


def test_a_model_with_other_tensors_is_refused_at_start(ir18_repository, triton, tmp_path):
    """Triton serves 'adaface_ir18' with 256-d embeddings: the server names the mismatch."""
    repository, name = ir18_repository
    twin = tmp_path / "twin"
    export_python_backend(repository, name, twin, threads=1)
    config_path = twin / name / "config.pbtxt"
    config_path.write_text(config_path.read_text().replace("dims: 512", "dims: 256"))
    triton = TritonProcess(twin, tmp_path / "triton.log", triton.install).start()
    server = ServerThread(
        server_settings(repository, name, backend="triton", triton_url=triton.url)
    ).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            deadline = time.monotonic() + 30
            while True:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Info(embedder_pb2.InfoRequest(), timeout=10)
                if "cannot be served" in err.value.details() or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            f"model 'adaface_ir18' on Triton at {triton.url} does not match what this server "
            "sends and expects: output OUTPUT__0 shape is [-1, 256], expected [-1, 512]"
        ) in err.value.details()
        assert server.health() == NOT_SERVING
    finally:
        server.stop()
        triton.stop()


# -- Triton going away and coming back -----------------------------------------------------


def test_triton_down_then_up_then_killed_then_restarted(
    ir18_repository, triton_repository, triton, tmp_path
):
    repository, name = ir18_repository
    port = free_port()
    target = f"Triton at 127.0.0.1:{port}"
    # Its own tritonserver: the session's one keeps serving the other tests.
    triton = TritonProcess(triton_repository, tmp_path / "triton.log", triton.install)
    settings = server_settings(
        repository,
        name,
        backend="triton",
        triton_url=f"127.0.0.1:{port}",
        triton_check_seconds=0.2,
        triton_connect_timeout_seconds=2.0,
    )
    server = ServerThread(settings).start()
    crops = [crop(300), crop(301)]
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            # 1. Triton not started yet: not serving, and the error names the target.
            time.sleep(0.3)
            assert server.health() == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                embed(stub, crops)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert target in err.value.details()

            # 2. Triton comes up: the server finds it without a restart.
            triton.start(port=port)
            server.wait_serving(timeout=60)
            before = embed(stub, crops)

            # 3. Triton dies (SIGKILL) with requests in flight: each one either finished or
            # fails with UNAVAILABLE (never INTERNAL, never hangs); then UNAVAILABLE at once,
            # naming the target, and health NOT_SERVING.
            request = embedder_pb2.EmbedRequest(images=[aligned(c) for c in crops * 4])
            in_flight = [stub.Embed.future(request, timeout=60) for _ in range(6)]
            triton.kill()
            for future in in_flight:
                try:
                    assert len(future.result().results) == 8
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    assert target in exc.details()
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                embed(stub, crops)
            assert time.monotonic() - t0 < 10  # failed fast, not after a long timeout
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert target in err.value.details()
            wait_health(server, NOT_SERVING, timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                embed(stub, crops)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert target in err.value.details()

            # 4. Triton restarts on the same port: SERVING again, same embeddings.
            triton.start(port=port)
            wait_health(server, SERVING, timeout=60)
            after = embed(stub, crops)
            np.testing.assert_array_equal(before[0], after[0])
    finally:
        server.stop()
        triton.stop()


def test_triton_binary_comes_from_the_pinned_wheel(triton):
    install = find_tritonserver()
    assert install == triton.install  # found again without reinstalling
    assert install.binary.name == "tritonserver"
    assert (install.backends / "python" / "triton_python_backend_stub").is_file()
    pinned = Path(__file__).resolve().parents[2] / "constraints.txt"
    assert "nvidia-pytriton==" in pinned.read_text()


def test_tls_to_triton(ir18_repository, triton_repository, triton, tmp_path):
    """--triton-tls with a private CA: the server verifies Triton's certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    secure = TritonProcess(
        triton_repository, tmp_path / "triton.log", triton.install, tls=(cert, key)
    ).start()
    repository, name = ir18_repository
    server = ServerThread(
        server_settings(
            repository,
            name,
            backend="triton",
            triton_url=secure.url,
            triton_tls=True,
            triton_root_certificates=str(cert),
        )
    ).start()
    try:
        server.wait_serving(timeout=60)
        with grpc.insecure_channel(server.address) as channel:
            got = embed(embedder_pb2_grpc.EmbedderStub(channel), [crop(400)])
        assert got[0].shape == (1, 512)
    finally:
        server.stop()
        secure.stop()
