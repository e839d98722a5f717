"""docker/k8s/: every manifest validates offline against the Kubernetes schemas, and every flag
and environment variable it passes exists in `adaface-server --help` (read at test time)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from adaface_server.models.export import build_parser as export_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
#: The oldest Kubernetes the manifests target (native gRPC probes are GA from 1.27).
KUBERNETES_VERSION = "1.30.0"


def manifests() -> list[tuple[str, dict]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        (f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc)
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
        if doc
    ]


def find(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(kind: str, name: str) -> dict:
    return find(kind, name)["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def server_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "adaface_server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("label,doc", manifests(), ids=[label for label, _ in manifests()])
def test_manifest_validates_against_the_kubernetes_schema(label, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_misspelt_field():
    doc = find("Deployment", "adaface-server")
    broken = yaml.safe_load(yaml.safe_dump(doc))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def server_settings_passed() -> tuple[set[str], set[str]]:
    """(flags, env var names) that the manifests hand to adaface-server."""
    server = container("Deployment", "adaface-server")
    flags = {a.split("=")[0] for a in server.get("args", []) if a.startswith("--")}
    env = {e["name"] for e in server.get("env", [])}
    for source in server.get("envFrom", []):
        env |= set(find("ConfigMap", source["configMapRef"]["name"])["data"])
    return flags, env


def test_every_flag_and_env_var_exists_in_server_help(server_help):
    flags, env = server_settings_passed()
    known_flags = set(re.findall(r"(--[a-z0-9-]+)", server_help))
    known_env = set(re.findall(r"\b((?:ADAFACE|PG)[A-Z0-9_]*)\b", server_help))
    assert env, "the server gets no settings"
    missing = (flags - known_flags) | (env - known_env)
    assert not missing, f"not in adaface-server --help: {sorted(missing)}"


def test_export_job_arguments_parse_as_adaface_export():
    export = container("Job", "adaface-export")
    assert export["command"] == ["adaface-export"]
    args = export_parser().parse_args(export["args"])
    assert args.if_missing and str(args.repository) == "/models"
    config = find("ConfigMap", "adaface-server")["data"]
    assert args.name == config["ADAFACE_MODEL"]


def test_shutdown_budget_covers_prestop_and_the_server_drain():
    pod = find("Deployment", "adaface-server")["spec"]["template"]["spec"]
    config = find("ConfigMap", "adaface-server")["data"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(config["ADAFACE_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain


def test_server_pods_are_non_root_read_only_and_probed_over_grpc():
    pod = find("Deployment", "adaface-server")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile).group(1)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert server["securityContext"]["allowPrivilegeEscalation"] is False
    port = int(find("ConfigMap", "adaface-server")["data"]["ADAFACE_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == port, probe
    assert {"cpu", "memory"} <= set(server["resources"]["requests"])
    assert find("Deployment", "adaface-server")["spec"]["replicas"] > 1
    budget = find("PodDisruptionBudget", "adaface-server")["spec"]
    selector = find("Deployment", "adaface-server")["spec"]["selector"]
    assert budget["selector"] == selector


def test_triton_has_a_gpu_ready_probe_and_the_url_the_servers_use():
    triton = container("Deployment", "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    assert triton["image"] in compose["triton"]["image"]
    assert triton["command"] == compose["triton"]["command"]
    host, port = find("ConfigMap", "adaface-server")["data"]["ADAFACE_TRITON_URL"].split(":")
    service = find("Service", host)["spec"]
    assert int(port) in {p["port"] for p in service["ports"]}


def test_autoscaler_uses_cpu_and_the_queue_depth_the_server_exports():
    hpa = find("HorizontalPodAutoscaler", "adaface-server")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "adaface-server"
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    metric = kinds["Pods"]["pods"]["metric"]["name"]
    metrics_source = (ROOT / "server" / "adaface_server" / "metrics.py").read_text()
    assert f'"{metric}"' in metrics_source
