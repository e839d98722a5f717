"""Container test fixtures: podman, the server image built offline, a readable model repository.

These tests build and run real images, so they are collected only by `make test-containers`
(which installs podman and sets ADAFACE_CONTAINER_TESTS=1), never by the plain `make test`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ..integration.triton_harness import find_tritonserver
from .podman import (
    CACHE,
    DOCKERFILE,
    ROOT,
    SERVER_IMAGE,
    Podman,
    debian_closure,
    dockerfile_base,
    wheelhouse,
    which_all,
)
from .stack import TRITON_TEST_IMAGE, service_image

if os.environ.get("ADAFACE_CONTAINER_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def podman() -> Podman:
    missing = which_all("podman", "debootstrap")
    if missing:
        pytest.fail(f"{missing} not installed: run `make test-containers` (it installs them)")
    return Podman()


@pytest.fixture(scope="session")
def server_image(podman: Podman) -> str:
    """docker/Dockerfile built with --network none on a local base tagged as its FROM."""
    podman.ensure_base(dockerfile_base())
    podman.build(SERVER_IMAGE, DOCKERFILE, ROOT, wheelhouse=wheelhouse())
    return SERVER_IMAGE


def published(repository: Path, dest: Path) -> Path:
    """A copy of a model repository with the modes a checkout has (dirs 755, files 644), so
    the image's unprivileged user can read it through a read-only bind mount."""
    shutil.copytree(repository, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    dest.parent.chmod(0o755)
    return dest


@pytest.fixture(scope="session")
def model_repository(ir18_repository, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The session's exported ir_18 test model, readable by the container user."""
    repository, name = ir18_repository
    return published(repository, tmp_path_factory.mktemp("published") / "models"), name


@pytest.fixture(scope="session")
def triton_image(podman: Podman, server_image: str, tmp_path_factory) -> str:
    """The CPU Triton test image: nvidia-pytriton's tritonserver on top of the server image."""
    install = find_tritonserver()  # also puts the 3.11 stub next to the python backend
    context = tmp_path_factory.mktemp("triton_context")
    server_dir = install.binary.parent.parent
    shutil.copytree(
        server_dir,
        context / "tritonserver",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "caches"),
    )
    shutil.copytree(server_dir.parent.parent / "nvidia_pytriton.libs", context / "lib")
    # libpython3.11 resolved against the server image's own packages: the host's apt may
    # offer a newer (security) build whose siblings (libpython3.11-stdlib, python3.11, ...)
    # must then come along, or dpkg refuses the mismatch.
    status = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "cat", server_image,
        "/var/lib/dpkg/status",
    )  # fmt: skip
    debs = debian_closure(["libpython3.11"], status.stdout, CACHE / "debs-triton")
    (context / "debs").mkdir()
    for deb in debs.glob("*.deb"):
        shutil.copy2(deb, context / "debs" / deb.name)
    dockerfile = Path(__file__).parent / "triton" / "Dockerfile"
    podman.build(TRITON_TEST_IMAGE, dockerfile, context, build_args={"BASE": server_image})
    return TRITON_TEST_IMAGE


@pytest.fixture(scope="session")
def postgres_image(podman: Podman, tmp_path_factory) -> str:
    """The compose file's postgres image (its default tag), built offline: Debian's
    postgresql-<major> on the debootstrapped base, our entrypoint (tests/containers/postgres)."""
    tag = service_image("postgres")
    major = tag.rsplit(":", 1)[1].split(".")[0]  # Debian's package of the same major version
    base = dockerfile_base()
    podman.ensure_base(base)
    status = podman("run", "--rm", "--network", "none", base, "cat", "/var/lib/dpkg/status")
    debs = debian_closure([f"postgresql-{major}"], status.stdout, CACHE / "debs-postgres")
    here = Path(__file__).parent / "postgres"
    context = tmp_path_factory.mktemp("postgres_context")
    shutil.copy2(here / "entrypoint.sh", context / "entrypoint.sh")
    (context / "debs").mkdir()
    for deb in debs.glob("*.deb"):
        try:
            os.link(deb, context / "debs" / deb.name)
        except OSError:  # another file system
            shutil.copy2(deb, context / "debs" / deb.name)
    podman.build(tag, here / "Dockerfile", context, build_args={"BASE": base, "PG_MAJOR": major})
    return tag
