"""Monitoring for real: Debian's Prometheus, started by `health-mlops demo`, scraping the demo's processes;
the alert rules under promtool; the Grafana dashboards' queries against the services' real /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from health_mlops.registry import Registry
from health_mlops.trust.audit import AuditLog
from tests.conftest import free_port_range, run_cli, wait_until_ready
from tests.integration.test_cli_train import processes_mentioning

pytestmark = pytest.mark.process

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
ALERTS = ("HospitalNodeDown", "ModelMetricDropped", "FeatureDrift", "PredictionLatencyHigh",
          "PredictionErrorRateHigh", "PredictionInputsRejected", "TrainingRoundStalled", "UpdatesRejected")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: `make test` installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, cwd=MONITORING, timeout=120)


def test_the_alert_rules_are_valid_and_each_alert_is_tested_firing_and_quiet() -> None:
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(ALERTS)} rules found" in checked.stdout
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    tests = (MONITORING / "alerts_test.yml").read_text()
    rules = (MONITORING / "alerts.yml").read_text()
    assert sorted(re.findall(r"- alert: (\w+)", rules)) == sorted(ALERTS)
    for alert in ALERTS:  # each alert is evaluated firing (a list of alerts) and quiet (an empty list)
        cases = [c.strip() for c in re.findall(rf"alertname: {alert}\n\s+exp_alerts:(.*)", tests)]
        assert "" in cases and "[]" in cases, (alert, cases)


def test_the_local_config_is_what_the_demo_writes_for_its_default_ports() -> None:
    from health_mlops.data.synthetic import hospital_ids
    from health_mlops.demo.federation import node_plan
    from health_mlops.demo.prometheus import local_config, local_targets

    plan = node_plan(Path("data"), hospital_ids(5), {})
    expected = local_config(local_targets(aggregator_port=8081, node_metrics_port=8001,
                                          nodes=[(p.hospital_id, p.node_id) for p in plan], dashboard_port=7860),
                            rule_files=["alerts.yml"])
    assert (MONITORING / "prometheus-local.yml").read_text() == expected
    checked = promtool("check", "config", "prometheus-local.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_compose_config_scrapes_every_compose_service() -> None:
    import yaml

    from health_mlops.demo.prometheus import COMPOSE_HEADER, compose_targets, local_config

    compose = yaml.safe_load((MONITORING.parent / "docker-compose.yml").read_text())
    hospitals = sorted(name for name in compose["services"] if name.startswith("hospital-"))
    expected = local_config(compose_targets(hospitals), rule_files=["/etc/prometheus/alerts.yml"], interval_s=15,
                            header=COMPOSE_HEADER)
    assert (MONITORING / "prometheus-compose.yml").read_text() == expected
    scraped = {t["targets"][0].split(":")[0] for job in yaml.safe_load(expected)["scrape_configs"]
               for t in job["static_configs"]}
    assert scraped == {"aggregator", "dashboard", *hospitals} and scraped <= set(compose["services"])
    checked = promtool("check", "config", "--syntax-only", "prometheus-compose.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def short_rules(folder: Path) -> Path:
    """The real alert rules with every `for:` cut to 2 s, so an alert can fire within a test."""
    path = folder / "alerts-short.yml"
    path.write_text(re.sub(r"for: \d+[smh]", "for: 2s", (MONITORING / "alerts.yml").read_text()))
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("monitoring")
    base = free_port_range(13)
    ports = {"aggregator": base, "node_api": base + 1, "node_metrics": base + 5, "aggregator_ops": base + 9,
             "dashboard": base + 11, "prometheus": base + 12}
    command = [sys.executable, "-m", "health_mlops.cli", "demo", "--hospitals", "3", "--rows-per-hospital", "600",
               "--rounds", "8", "--port", str(ports["aggregator"]), "--node-api-port", str(ports["node_api"]),
               "--node-metrics-port", str(ports["node_metrics"]), "--dashboard-port", str(ports["dashboard"]),
               "--prometheus-port", str(ports["prometheus"]), "--ops-port", str(ports["aggregator_ops"])]
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(root / "home"),
           "HEALTH_MLOPS_PROMETHEUS_RULES": str(short_rules(root)), "HEALTH_MLOPS_PROMETHEUS_SCRAPE_INTERVAL_S": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{ports['dashboard']}/readyz", process, timeout_s=600)
        yield {"ports": ports, "prometheus": f"http://127.0.0.1:{ports['prometheus']}", "home": root / "home"}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not seen after {timeout_s:.0f} s"
        time.sleep(0.5)


@pytest.mark.xdist_group("monitoring-demo")  # one demo for these tests
def test_prometheus_scrapes_every_process_and_sees_the_training(demo: dict[str, Any]) -> None:
    prometheus = demo["prometheus"]

    def all_up() -> list[dict] | None:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return targets if len(targets) == 6 and all(t["health"] == "up" for t in targets) else None

    targets = eventually(all_up, "the aggregator, 4 nodes and the dashboard all up")
    assert sorted(t["labels"]["component"] for t in targets) == ["aggregator", "dashboard", "node", "node", "node",
                                                                 "node"]
    assert eventually(lambda: query(prometheus, "changes(health_mlops_federation_round[10m]) > 0"),
                      "the round metric advancing")
    per_hospital = eventually(lambda: query(prometheus, 'health_mlops_hospital_model_metric{metric="auc"}'),
                              "per-hospital metrics")
    assert sorted(r["metric"]["hospital"] for r in per_hospital) == ["hospital-1", "hospital-2", "hospital-3"]
    assert query(prometheus, 'health_mlops_data_rows{status="valid", hospital="hospital-3"}')


@pytest.mark.xdist_group("monitoring-demo")  # one demo for these tests
def test_audit_verify_finds_a_log_cut_below_the_highest_line_prometheus_saw(demo: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    """The aggregator publishes its audit log's last line number; Prometheus keeps its history, which the log's
    writer cannot roll back. A copy of the log cut below that line fails `audit verify --prometheus`."""
    home: Path = demo["home"]
    run_cli("dashboard-account", "key", "monitoring-probe", home=home)  # an audit line after every registration
    head = AuditLog(home / "audit.log").head()
    assert head > max(anchor.seq for anchor in Registry(home, "health-risk").audit_anchors("local"))
    eventually(lambda: query(demo["prometheus"], f"health_mlops_audit_log_sequence >= {head}"),
               "Prometheus scraping the audit log's head")
    lines = (home / "audit.log").read_text().splitlines()[:head]
    copy = tmp_path / "audit.log"
    copy.write_text("".join(line + "\n" for line in lines))
    intact = run_cli("audit", "verify", "--log", str(copy), "--prometheus", demo["prometheus"], home=home)
    assert "the chain is intact" in intact.stdout
    copy.write_text("".join(line + "\n" for line in lines[:-1]))
    cut = run_cli("audit", "verify", "--log", str(copy), "--prometheus", demo["prometheus"], home=home, check=False)
    # Every line MLflow anchored is still in the copy: only Prometheus' history shows the cut.
    assert cut.returncode == 1 and f"cut short: Prometheus ({demo['prometheus']}) saw line {head}" in cut.stderr


@pytest.mark.xdist_group("monitoring-demo")  # one demo for these tests
def test_a_killed_node_fires_hospital_node_down(demo: dict[str, Any]) -> None:
    prometheus = demo["prometheus"]
    eventually(lambda: query(prometheus, 'up{node="hospital-2-a"} == 1'), "hospital-2's node up first")
    # This demo's node: another federation on the machine (a parallel test run) may have a hospital-2-a too.
    ours = set(processes_mentioning(f"--central-url https://127.0.0.1:{demo['ports']['aggregator']}"))
    (pid,) = [p for p in processes_mentioning("--node-id hospital-2-a") if p in ours]
    os.kill(pid, signal.SIGKILL)

    def firing() -> list[dict]:
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "HospitalNodeDown" and a["state"] == "firing"]

    (alert,) = eventually(firing, "HospitalNodeDown firing")
    assert alert["labels"]["hospital"] == "hospital-2"
    assert "hospital-2" in alert["annotations"]["summary"]


def exposed_names(text: str) -> set[str]:
    """Every series name a query can use, from a /metrics page (declared families, sampled or not)."""
    names = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "info": ["_info"], "summary": ["_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


@pytest.mark.xdist_group("monitoring-demo")  # one demo for these tests
def test_every_dashboard_and_alert_query_uses_metrics_the_services_expose(demo: dict[str, Any]) -> None:
    ports = demo["ports"]
    pages = [httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
             for port in (ports["aggregator_ops"], ports["node_metrics"] + 1, ports["dashboard"])]
    exposed = set().union(*(exposed_names(page) for page in pages))
    used: dict[str, set[str]] = {}
    for board in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(board.read_text())["panels"]:
            for target in panel["targets"]:
                used.setdefault(board.name, set()).update(re.findall(r"health_mlops_\w+", target["expr"]))
    used["alerts.yml"] = set(re.findall(r"health_mlops_\w+", (MONITORING / "alerts.yml").read_text()))
    assert sorted(used) == ["alerts.yml", "drift.json", "federated-training.json", "hospitals.json", "serving.json"]
    missing = {source: sorted(names - exposed) for source, names in used.items() if names - exposed}
    assert not missing, f"queries use metrics no service exposes: {missing}"
