"""The compose test stack stays docker/compose.cpu.yaml except for its documented changes."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.containers.stack import (
    COMPOSE_CPU,
    TRITON_TEST_IMAGE,
    TWIN_TARGET,
    StackPaths,
    environment,
    extra_services,
    generate,
    service_image,
)

PATHS = StackPaths(Path("/t/models"), Path("/t/twin"), Path("/t/ckpt"), Path("/t/pg_password"))
PORTS = {"50051": 40001, "9464": 40002, "8000": 40003, "8001": 40004, "8002": 40005}


def targets(service: dict) -> list[str]:
    return [spec.split(":")[-2] if spec.endswith(":ro") else spec.split(":")[-1]
            for spec in service.get("volumes", [])]  # fmt: skip


def test_generated_stack_differs_only_where_documented():
    real = yaml.safe_load(COMPOSE_CPU.read_text())
    stack = generate(PATHS, PORTS)
    assert stack["name"] == real["name"] and stack["volumes"] == real["volumes"]
    assert stack["secrets"] == real["secrets"]  # the file comes from the environment
    assert set(stack["services"]) == set(real["services"])
    assert extra_services(stack) == extra_services(real)
    for name, ours in stack["services"].items():
        theirs = real["services"][name]
        # Same environment, secrets, healthcheck, start order, restart policy and user.
        keys = ("environment", "secrets", "healthcheck", "depends_on", "restart", "user")
        for key in (*keys, "entrypoint"):
            assert ours.get(key) == theirs.get(key), (name, key)
        # Same container ports, on loopback host ports.
        assert [p.split(":")[-1] for p in ours.get("ports", [])] == [
            p.split(":")[-1] for p in theirs.get("ports", [])
        ]
        assert all(p.startswith("127.0.0.1:") for p in ours.get("ports", []))
        extra = [TWIN_TARGET] if name == "export" else []
        assert targets(ours) == [*targets(theirs), *extra], name
        assert "build" not in ours
    services, real_services = stack["services"], real["services"]
    assert services["server"]["command"] == real_services["server"]["command"]
    assert services["server"]["image"] == real_services["server"]["image"]
    assert services["triton"]["command"] == real_services["triton"]["command"]
    assert services["triton"]["image"] == TRITON_TEST_IMAGE
    # PostgreSQL is the real file's service, image name included (the test builds a local
    # stand-in tagged as that name); only its host ports would change, and it has none.
    assert services["postgres"] == real_services["postgres"]
    assert services["export"]["command"] == [
        *real_services["export"]["command"],
        "--python-backend",
        TWIN_TARGET,
    ]


def test_model_repository_mounts_point_at_the_test_folders():
    services = generate(PATHS, PORTS)["services"]
    assert f"{PATHS.model_repository}:/models:ro" in services["server"]["volumes"]
    assert f"{PATHS.twin_repository}:/models:ro" in services["triton"]["volumes"]
    assert f"{PATHS.model_repository}:/models" in services["export"]["volumes"]
    assert f"{PATHS.twin_repository}:{TWIN_TARGET}" in services["export"]["volumes"]


def test_postgres_runs_the_files_image_with_the_tests_own_password_file():
    real = yaml.safe_load(COMPOSE_CPU.read_text())["services"]["postgres"]
    assert real["image"] == "${POSTGRES_IMAGE:-postgres:15.10-bookworm}"
    assert service_image("postgres") == "docker.io/library/postgres:15.10-bookworm"
    env = environment(PATHS, "m", "ir_18")
    assert env["ADAFACE_POSTGRES_PASSWORD_FILE"] == str(PATHS.postgres_password)
    assert "POSTGRES_IMAGE" not in env  # the file's default image, as a user gets it
