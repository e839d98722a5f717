"""The compose test stack, generated from docker/compose.cpu.yaml so the two cannot drift.

Same services (export -> triton -> server), container ports, volume targets, environment,
commands and healthchecks as the real file. What differs, and why:
- host ports are free loopback ports (several runs share this machine), container ports stay;
- ../model_repository is the test's own folder (ADAFACE_CHECKPOINT_DIR stays a variable:
  `environment()` sets it);
- triton runs a CPU image built from nvidia-pytriton's tritonserver binary (NVIDIA's image
  cannot be pulled here); that binary has only the python backend, so the export service
  also writes the python-backend twin (`--python-backend`) and triton serves the twin;
- `build:` is dropped (the test builds the images first, offline) and `ulimits:` too (root
  here may not raise RLIMIT_MEMLOCK/STACK; podman refuses to start the container).
PostgreSQL galleries: the `postgres` service is carried over unchanged (image name included;
hook: `extra_services`) and the server keeps its environment. Its image cannot be pulled
here either: the test builds a stand-in from Debian's postgresql-15 and tags it as the
file's default image name (tests/containers/postgres/; `service_image`). The password secret
is the file compose already reads from ADAFACE_POSTGRES_PASSWORD_FILE, which `environment()`
points at the test's own throw-away file (never ../.secrets/).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .podman import ROOT

COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yaml"
TRITON_TEST_IMAGE = "localhost/adaface-triton-cpu:test"
TWIN_TARGET = "/twin"


@dataclass(frozen=True)
class StackPaths:
    """Host folders the stack mounts."""

    model_repository: Path  # export writes here; server reads it (../model_repository)
    twin_repository: Path  # export writes the python-backend twin here; triton reads it
    checkpoints: Path  # ADAFACE_CHECKPOINT_DIR (empty: random weights)
    postgres_password: Path  # ADAFACE_POSTGRES_PASSWORD_FILE (the postgres_password secret)


def _port(spec: str, host_ports: dict[str, int]) -> str:
    container = spec.split(":")[-1]
    return f"127.0.0.1:{host_ports[container]}:{container}"


def _rebind(spec: str, source: Path) -> str:
    _, target, *mode = spec.split(":")
    return ":".join([str(source), target, *mode])


def generate(paths: StackPaths, host_ports: dict[str, int], source: Path = COMPOSE_CPU) -> dict:
    """The test stack as a compose document (see the module docstring for each change)."""
    stack = copy.deepcopy(yaml.safe_load(source.read_text()))
    services = stack["services"]
    for service in services.values():
        service.pop("build", None)
        service.pop("ulimits", None)
        service["ports"] = [_port(p, host_ports) for p in service.get("ports", [])]
        volumes = []
        for spec in service.get("volumes", []):
            if spec.startswith("../model_repository:"):
                spec = _rebind(spec, paths.model_repository)
            volumes.append(spec)
        service["volumes"] = volumes
        if not service["ports"]:
            del service["ports"]
    export, triton = services["export"], services["triton"]
    export["volumes"].append(f"{paths.twin_repository}:{TWIN_TARGET}")
    export["command"] = [*export["command"], "--python-backend", TWIN_TARGET]
    triton["image"] = TRITON_TEST_IMAGE
    triton["volumes"] = [
        _rebind(v, paths.twin_repository) if v.split(":")[1] == "/models" else v
        for v in triton["volumes"]
    ]
    return stack


def environment(paths: StackPaths, model: str, arch: str) -> dict[str, str]:
    """The variables compose.cpu.yaml documents, as a user would set them for a small model."""
    return {
        "ADAFACE_UID": str(os.getuid()),  # as the header says: the files are yours
        "ADAFACE_GID": str(os.getgid()),
        "ADAFACE_ARCH": arch,
        "ADAFACE_MODEL_NAME": model,
        "ADAFACE_CHECKPOINT_DIR": str(paths.checkpoints),
        "ADAFACE_POSTGRES_PASSWORD_FILE": str(paths.postgres_password),
    }


def service_image(name: str, source: Path = COMPOSE_CPU) -> str:
    """The image `name` runs with the file's defaults (`${VAR:-default}`), fully qualified as
    Docker Hub names are (`postgres:15` is docker.io/library/postgres:15)."""
    image = yaml.safe_load(source.read_text())["services"][name]["image"]
    image = re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", image)
    if "/" not in image:
        return f"docker.io/library/{image}"
    first = image.split("/")[0]
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def extra_services(stack: dict) -> set[str]:
    """Services beyond export/triton/server (e.g. a future postgres), carried over as-is."""
    return set(stack["services"]) - {"export", "triton", "server"}
