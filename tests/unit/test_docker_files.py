"""docker/: no container engine runs here, so check that everything the Dockerfile and the
compose files reference (paths, ports, flags, env vars, images) exists in the project."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from pathlib import Path

import pytest
import yaml

from adaface_server.config import Settings, parse_settings
from adaface_server.models.export import build_parser as export_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ["compose.yaml", "compose.cpu.yaml"]
TRITON_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3$")
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")
SETTINGS = {f.name for f in dataclasses.fields(Settings)}


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: every variable must have a default."""

    def default(match: re.Match) -> str:
        if match.group(2) is None:
            raise AssertionError(f"${{{match.group(1)}}} has no default: {value!r}")
        return match.group(2)

    return VARIABLE.sub(default, value)


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.fixture(params=COMPOSE_FILES)
def compose(request) -> dict:
    return load(request.param)


def command(service: dict) -> list[str]:
    return [interpolate(str(arg)) for arg in service.get("command", [])]


def host_volumes(service: dict) -> dict[str, str]:
    """container path -> host path (bind mounts only), resolved like compose does."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = interpolate(spec).split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = source
    return mounts


def test_services_and_pinned_images(compose):
    assert set(compose["services"]) == {"export", "triton", "postgres", "server"}
    postgres = interpolate(compose["services"]["postgres"]["image"])
    assert re.fullmatch(r"postgres:\d+\.\d+-bookworm", postgres), postgres
    triton = compose["services"]["triton"]
    assert TRITON_IMAGE.match(interpolate(triton["image"])), triton["image"]
    ours = {compose["services"][s]["image"] for s in ("export", "server")}
    assert len(ours) == 1 and not ours.pop().endswith(":latest")


def test_every_referenced_path_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == ROOT, f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file()
        for target, source in host_volumes(service).items():
            assert (DOCKER / source).resolve().exists(), f"{name}: {source} -> {target}"
    # The model Triton and the server load by default is the committed repository entry.
    model = command(compose["services"]["server"])
    name = model[model.index("--model") + 1]
    assert (ROOT / "model_repository" / name / "config.pbtxt").is_file()


def test_the_three_services_share_one_model_repository(compose):
    services = compose["services"]
    repos = {
        (DOCKER / host_volumes(services[s])["/models"]).resolve()
        for s in ("export", "triton", "server")
    }
    assert repos == {ROOT / "model_repository"}
    assert "--model-repository=/models" in command(services["triton"])
    assert services["server"]["environment"]["ADAFACE_MODEL_REPOSITORY"] == "/models"
    # Only the exporter writes there.
    for s in ("triton", "server"):
        assert any(v.startswith("../model_repository:/models:ro") for v in services[s]["volumes"])


def test_server_flags_and_env_vars_are_settings(compose):
    server = compose["services"]["server"]
    environment = {k: str(v) for k, v in server["environment"].items()}
    for key in environment:
        assert key.startswith("ADAFACE_") and key[8:].lower() in SETTINGS, key
    argv = command(server)
    for flag in (a for a in argv if a.startswith("--")):
        assert flag[2:].replace("-", "_") in SETTINGS, flag
    # Parses exactly as the server would: flags, env and validation together.
    settings = parse_settings(argv, env=environment)
    assert settings.backend == "triton"
    host, port = settings.triton_url.split(":")
    assert host in compose["services"]
    triton_ports = {p.split(":")[1] for p in compose["services"]["triton"]["ports"]}
    assert port in triton_ports and triton_ports == {"8000", "8001", "8002"}
    metrics = settings.metrics_port
    assert server["ports"] == [f"{settings.port}:{settings.port}", f"{metrics}:{metrics}"]
    assert server["ports"] == ["50051:50051", "9464:9464"]


def test_export_service_runs_our_exporter_idempotently(compose):
    export = compose["services"]["export"]
    assert export["entrypoint"] == ["adaface-export"]
    args = export_parser().parse_args(command(export))
    assert args.if_missing and str(args.repository) == "/models"
    assert args.checkpoint is None  # unset ADAFACE_CHECKPOINT = random weights, said loudly
    assert "/checkpoints" in {interpolate(v).split(":")[1] for v in export["volumes"]}
    assert export["restart"] == "no"


def test_start_order_health_and_restart(compose):
    services = compose["services"]
    assert services["triton"]["depends_on"] == {
        "export": {"condition": "service_completed_successfully"}
    }
    assert services["server"]["depends_on"] == {
        "triton": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    for name in ("triton", "postgres", "server"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert "/v2/health/ready" in services["triton"]["healthcheck"]["test"][-1]
    assert services["server"]["healthcheck"]["test"][1:] == [
        "python",
        "-m",
        "adaface_server.healthcheck",
    ]
    assert (ROOT / "server" / "adaface_server" / "healthcheck.py").is_file()


def test_gpu_and_cpu_variants_differ_only_in_the_device_reservation():
    gpu, cpu = load("compose.yaml"), load("compose.cpu.yaml")
    devices = gpu["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    del gpu["services"]["triton"]["deploy"]
    assert gpu == cpu


def test_every_compose_variable_is_documented_in_the_header():
    for name in COMPOSE_FILES:
        text = (DOCKER / name).read_text()
        header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
        for variable in {m.group(1) for m in VARIABLE.finditer(text)}:
            assert variable in header, f"{name}: ${{{variable}}} is not documented"


def dockerfile_stages() -> list[list[str]]:
    lines = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    stages: list[list[str]] = [[]]
    for line in (raw.strip() for raw in lines):
        if line.startswith("FROM "):
            stages.append([])
        if line and not line.startswith("#"):
            stages[-1].append(line)
    return stages


def test_dockerfile_is_pinned_multistage_and_non_root():
    preamble, *stages = dockerfile_stages()
    assert len(stages) == 2
    base = next(line for line in preamble if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm", base)
    final = stages[-1]
    assert final[0] == "FROM ${PYTHON_IMAGE}"
    users = [line for line in final if line.startswith("USER ")]
    assert users and not users[-1].startswith(("USER root", "USER 0"))
    assert any("HEALTHCHECK" in line and "adaface_server.healthcheck" in line for line in final)
    text = " ".join(final)
    for tool in ("gcc", "g++", "build-essential", "apt-get install", "pip install"):
        assert tool not in text, f"final stage installs {tool}"
    assert 'ENTRYPOINT ["adaface-server"]' in final


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [
        line.split()[1:-1]
        for stage in dockerfile_stages()
        for line in stage
        if line.startswith("COPY ") and "--from=" not in line
    ]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    # Weights and the venv never enter the build context.
    for pattern in (".venv", "**/*.pt", "**/*.ckpt"):
        assert pattern in ignored


def test_server_keeps_its_galleries_in_the_postgres_service(compose):
    services = compose["services"]
    server, postgres = services["server"], services["postgres"]
    settings = parse_settings([], env={k: str(v) for k, v in server["environment"].items()})
    assert settings.gallery_url == "postgresql://adaface@postgres:5432/galleries"
    env = postgres["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("adaface", "galleries")
    # One secret file gives the password to both; it is never in the URL or the environment.
    secret = "/run/secrets/postgres_password"
    assert env["POSTGRES_PASSWORD_FILE"] == secret == settings.gallery_password_file
    assert server["secrets"] == postgres["secrets"] == ["postgres_password"]
    assert "postgres_password" in compose["secrets"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
