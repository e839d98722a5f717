"""The server image, run as a user would: non-root, model read-only, galleries on a volume.

One container on a published loopback port: its own HEALTHCHECK decides when it is ready, the
client embeds a photo from the host, a gallery outlives a restart, SIGTERM exits cleanly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import pytest
import skimage.data
from PIL import Image

from adaface_client import Client
from adaface_client.gallery import GalleryClient

from ..integration.server_harness import ServerThread, server_settings
from ..integration.triton_harness import free_port
from .podman import Podman

GRACE_SECONDS = 5
UID = "10001"


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


PHOTO = jpeg(skimage.data.astronaut())


class Container:
    """One `podman run -d` of the server image; `address` is its published gRPC port."""

    def __init__(self, podman: Podman, image: str, models: str, model: str) -> None:
        self.podman = podman
        self.name = f"adaface-server-test-{os.getpid()}"
        self.volume = f"{self.name}-data"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = [
            "run", "-d", "--name", self.name,
            "-p", f"{self.address}:50051",
            "-v", f"{models}:/models:ro",
            "-v", f"{self.volume}:/data",
            # As docker/k8s/server.yaml runs it: read-only root filesystem with an empty /tmp,
            # no capabilities, no privilege escalation.
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            image,
            "--model", model, "--threads", "1", "--grace-seconds", str(GRACE_SECONDS),
            # Compared with the embedded backend at 1e-5: exact fp32, as server_settings
            # does (the default, auto, runs bf16 on a CPU with avx512_bf16/AMX).
            "--precision", "fp32",
        ]  # fmt: skip

    def start(self) -> Container:
        self.podman(*self.args)
        self.podman.wait_healthy(self.name)
        return self

    def remove(self) -> None:
        self.podman("rm", "-f", "-t", "0", self.name, check=False)
        self.podman("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture(scope="module")
def container(podman, server_image, model_repository) -> Iterator[Container]:
    repository, name = model_repository
    running = Container(podman, server_image, str(repository), name)
    running.remove()
    try:
        yield running.start()
    finally:
        running.remove()


@pytest.fixture(scope="module")
def reference(model_repository) -> Iterator[np.ndarray]:
    """The photo embedded by the embedded backend in this process, outside any container."""
    repository, name = model_repository
    server = ServerThread(server_settings(repository, name)).start().wait_serving()
    try:
        with Client(server.address) as client:
            embeddings, _ = client.embed([PHOTO], alignment="detect")
    finally:
        server.stop()
    return embeddings


def test_runs_unprivileged_with_the_model_and_root_filesystem_read_only(podman, container):
    assert podman.inspect(container.name)["Config"]["User"].startswith("adaface")
    assert podman("exec", container.name, "id", "-u").stdout.strip() == UID
    denied = podman("exec", container.name, "touch", "/models/written", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    podman("exec", container.name, "touch", "/data/writable")
    root = podman("exec", container.name, "touch", "/srv/written", check=False)
    assert root.returncode != 0 and "Read-only file system" in root.stderr


def test_embeds_a_host_photo_through_the_published_port(container, reference):
    with Client(container.address) as client:
        info = client.info()
        embeddings, norms = client.embed([PHOTO], alignment="detect")
    assert info.backend == "torchscript"
    assert embeddings.shape == reference.shape == (1, info.embedding_dim)
    assert float(norms[0, 0]) > 0
    np.testing.assert_allclose(embeddings, reference, rtol=0, atol=1e-5)


def test_gallery_survives_a_restart_on_the_same_volume(podman, container):
    with GalleryClient(container.address) as gallery:
        gallery.create_gallery("crew")
        enrolled = gallery.enroll("crew", "eileen", [PHOTO], alignment="detect")
    assert enrolled.errors == [] and enrolled.sample_count == 1
    podman("restart", "-t", str(GRACE_SECONDS + 10), container.name)
    podman.wait_healthy(container.name)
    with GalleryClient(container.address) as gallery:
        assert gallery.get_gallery("crew").identity_count == 1
        (probe,) = gallery.search("crew", [PHOTO], alignment="detect", top_k=1)
    assert probe.ok and [m.identity for m in probe.matches] == ["eileen"]
    assert probe.matches[0].score > 0.99


def test_sigterm_exits_cleanly_within_the_grace_period(podman, container):
    # podman stop sends SIGTERM, then SIGKILL (exit 137) once the timeout has passed.
    podman("stop", "-t", str(GRACE_SECONDS + 10), container.name)
    state = podman.state(container.name)
    assert state["Status"] == "exited"
    assert state["ExitCode"] == 0, podman.logs(container.name)
