"""The compose stack, brought up by podman-compose: postgres, export -> triton -> server.

Healthchecks do not run by themselves here (no systemd) and `condition: service_healthy` is
not honoured, so the test starts each service in order and polls `podman healthcheck run`.
The server keeps its galleries in the stack's PostgreSQL (a stand-in image built from
Debian's postgresql-15, tagged as the file's postgres image; see conftest.postgres_image).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from adaface_client import Client, GalleryClient
from adaface_client.client import Unavailable

from ..integration.server_harness import ServerThread, server_settings
from ..integration.triton_harness import free_port
from .podman import Podman
from .stack import StackPaths, environment, extra_services, generate
from .test_server_image import PHOTO

ARCH, MODEL = "ir_18", "adaface_ir18"
CONTAINER_PORTS = ("50051", "9464", "8000", "8001", "8002")


@dataclass
class Compose:
    """podman-compose on one generated file and project, with this session's podman storage."""

    podman: Podman
    file: Path
    project: str
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> str:
        command = [str(Path(sys.executable).with_name("podman-compose"))]
        command += ["-f", str(self.file), "-p", self.project, *args]
        result = subprocess.run(
            command, env={**self.podman.env, **self.env}, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} -> {result.returncode}\n{result.stderr[-3000:]}")
        return result.stdout

    def container(self, service: str) -> str:
        names = self.podman(
            "ps", "-a", "--format", "{{.Names}}",
            "--filter", f"label=com.docker.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
        ).stdout.split()  # fmt: skip
        assert len(names) == 1, names
        return names[0]


@dataclass
class Stack:
    compose: Compose
    paths: StackPaths
    address: str  # the server's published gRPC port


def reference_embedding(repository: Path) -> np.ndarray:
    """The photo through the embedded backend, in this process, on the stack's own export."""
    server = ServerThread(server_settings(repository, MODEL)).start().wait_serving()
    try:
        with Client(server.address) as client:
            return client.embed([PHOTO], alignment="detect")[0]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(podman, server_image, triton_image, postgres_image, tmp_path_factory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    work.chmod(0o755)
    paths = StackPaths(
        work / "model_repository", work / "triton_repository", work / "ckpt", work / "pg_password"
    )
    for folder in (paths.model_repository, paths.twin_repository, paths.checkpoints):
        folder.mkdir(mode=0o755)
    # The secret the compose file reads (ADAFACE_POSTGRES_PASSWORD_FILE): throw-away, and
    # readable by both containers' users (postgres, adaface) through the bind mount.
    paths.postgres_password.write_text(secrets.token_hex(24) + "\n")
    paths.postgres_password.chmod(0o644)
    ports = {port: free_port() for port in CONTAINER_PORTS}
    file = work / "compose.test.yaml"
    document = generate(paths, ports)
    file.write_text(yaml.safe_dump(document, sort_keys=False))
    compose = Compose(podman, file, f"adaface-test-{os.getpid()}", environment(paths, MODEL, ARCH))
    try:
        # Services beyond export/triton/server (postgres) start first; their images must
        # exist locally (built by a fixture like postgres_image: no registry is reachable).
        for service in sorted(extra_services(document)):
            compose("up", "-d", "--no-deps", service)
            if "healthcheck" in document["services"][service]:
                podman.wait_healthy(compose.container(service))
        compose("up", "-d", "--no-deps", "export")
        export = compose.container("export")
        exit_code = podman("wait", export, timeout=600).stdout.strip()
        assert exit_code == "0", podman.logs(export)
        compose("up", "-d", "--no-deps", "triton")
        podman.wait_healthy(compose.container("triton"))
        compose("up", "-d", "--no-deps", "server")
        podman.wait_healthy(compose.container("server"))
        yield Stack(compose, paths, f"127.0.0.1:{ports['50051']}")
    finally:
        compose("down", "-v", "-t", "5", timeout=300)


def embed(address: str) -> tuple[str, np.ndarray]:
    with Client(address, retries=0) as client:
        info = client.info()
        return info.backend, client.embed([PHOTO], alignment="detect")[0]


def test_export_wrote_the_model_and_its_python_backend_twin(stack):
    for repository in (stack.paths.model_repository, stack.paths.twin_repository):
        assert (repository / MODEL / "config.pbtxt").is_file()
        assert (repository / MODEL / "1").is_dir()
    assert (stack.paths.model_repository / MODEL / "1" / "model.pt").is_file()
    assert (stack.paths.twin_repository / MODEL / "1" / "model.py").is_file()


def test_embed_through_triton_equals_the_embedded_backend(stack):
    backend, embeddings = embed(stack.address)
    assert backend == "triton"
    reference = reference_embedding(stack.paths.model_repository)
    np.testing.assert_allclose(embeddings, reference, rtol=0, atol=1e-5)


def test_stopping_triton_gives_unavailable_then_recovery(podman, stack):
    reference = reference_embedding(stack.paths.model_repository)
    stack.compose("stop", "-t", "5", "triton")
    with pytest.raises(Unavailable):
        embed(stack.address)
    stack.compose("start", "triton")
    podman.wait_healthy(stack.compose.container("triton"))
    deadline = time.monotonic() + 120
    while True:
        try:
            _, embeddings = embed(stack.address)
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    np.testing.assert_allclose(embeddings, reference, rtol=0, atol=1e-5)
    podman.wait_healthy(stack.compose.container("server"))


def psql(podman: Podman, stack: Stack, sql: str) -> str:
    """`sql` through psql inside the postgres container, as the compose file's user."""
    container = stack.compose.container("postgres")
    command = ["exec", container, "psql", "-U", "adaface", "-d", "galleries", "-tAc", sql]
    return podman(*command).stdout.strip()


def test_galleries_are_stored_in_postgres_and_survive_a_server_restart(podman, stack):
    with GalleryClient(stack.address) as gallery:
        gallery.create_gallery("staff")
        result = gallery.enroll("staff", "alice", [PHOTO])
        assert not result.errors, result
    assert psql(podman, stack, "SELECT name FROM galleries") == "staff"
    assert psql(podman, stack, "SELECT name FROM identities") == "alice"
    tables = psql(podman, stack, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    assert {"galleries", "identities", "samples"} <= set(tables.split())

    server = stack.compose.container("server")
    podman("restart", "-t", "10", server, timeout=120)
    podman.wait_healthy(server)
    with GalleryClient(stack.address) as gallery:
        [probe] = gallery.search("staff", [PHOTO], top_k=1)
        assert probe.ok, probe
        assert [m.identity for m in probe.matches] == ["alice"]
        assert probe.matches[0].score > 0.99


def test_postgres_stops_cleanly(podman, stack):
    """Last: `podman stop` (the image's stop signal, fast shutdown) with the server still
    connected ends in a checkpoint and exit 0, not in a kill after the timeout."""
    container = stack.compose.container("postgres")
    podman("stop", "-t", "30", container, timeout=120)
    state = podman.state(container)
    assert state["ExitCode"] == 0, podman.logs(container)
    assert "database system is shut down" in podman.logs(container)
