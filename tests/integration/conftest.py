"""Integration fixtures: a real embedding server on loopback serving the ir_18 test model."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaface_server.models.export import export_python_backend

from .server_harness import ServerThread, server_settings
from .triton_harness import (
    TritonProcess,
    TritonUnavailable,
    find_tritonserver,
    missing_tritonserver,
)

#: Backends a module can run its embed_server tests on, with
#: `pytestmark = pytest.mark.parametrize("embed_server", BACKENDS, indirect=True)`.
BACKENDS = ["torchscript", "triton"]


@pytest.fixture(scope="session")
def embed_server(request, ir18_repository):
    """A SERVING server: `.address` is "127.0.0.1:PORT", `.spec` the exported ModelSpec.

    Embedded TorchScript unless parametrised indirectly with "triton" (then it forwards to
    the session's real tritonserver, and the test is skipped if none can be installed).
    """
    repository, name = ir18_repository
    backend = getattr(request, "param", "torchscript")
    overrides: dict[str, object] = {}
    if backend == "triton":
        overrides = {"backend": "triton", "triton_url": request.getfixturevalue("triton").url}
    settings = server_settings(repository, name, max_images_per_request=32, **overrides)
    server = ServerThread(settings).start()
    server.wait_serving()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def triton_repository(ir18_repository, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python-backend twin of the ir_18 test model (the bundled Triton has no libtorch)."""
    repository, name = ir18_repository
    twin = tmp_path_factory.mktemp("triton_repository")
    export_python_backend(repository, name, twin, threads=1)
    return twin


@pytest.fixture(scope="session")
def triton(triton_repository, tmp_path_factory: pytest.TempPathFactory):
    """A real tritonserver on a free loopback port serving triton_repository; killed at the end."""
    try:
        install = find_tritonserver()
    except TritonUnavailable as exc:
        missing_tritonserver(exc)
    log_path = tmp_path_factory.mktemp("triton_logs") / "tritonserver.log"
    process = TritonProcess(triton_repository, log_path, install).start()
    yield process
    process.stop()


# A throw-away PostgreSQL cluster shared by the session (see postgres_harness.py).
POSTGRES_PASSWORD = "pg-secret-4f9c2e"  # tests check it never shows in logs or errors


@pytest.fixture(scope="session")
def postgres():
    from .postgres_harness import PostgresCluster

    cluster = PostgresCluster(POSTGRES_PASSWORD).init()
    try:
        yield cluster
    finally:
        cluster.remove()
