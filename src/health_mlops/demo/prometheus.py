"""The demo's Prometheus: a scrape config for the processes it starts, and Debian's `prometheus` beside the demo
scraping them with the alert rules, if it is installed.

Every target carries `component` (aggregator, node, dashboard) and, for nodes, `hospital` and `node`: the
labels the alert rules and Grafana dashboards use, as the Kubernetes config (`monitoring/prometheus.yml`)
sets them from pod labels. `monitoring/prometheus-local.yml` is this config for the demo's default ports.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console

from health_mlops.config import Settings
from health_mlops.demo.federation import Ports
from health_mlops.demo.processes import Processes

# The repository's monitoring folder (alerts.yml, dashboards); present in a source checkout.
MONITORING_DIR = Path(__file__).resolve().parents[3] / "monitoring"
ALERT_RULES = MONITORING_DIR / "alerts.yml"


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str
    labels: dict[str, str]


def local_targets(*, aggregator_port: int, node_metrics_port: int, nodes: list[tuple[str, str]],
                  dashboard_port: int | None) -> list[ScrapeTarget]:
    """The demo's processes; `nodes` are (hospital, node id) in the order their metrics ports are given out."""
    targets = [ScrapeTarget("aggregator", f"127.0.0.1:{aggregator_port}", {"component": "aggregator"})]
    targets += [ScrapeTarget("nodes", f"127.0.0.1:{node_metrics_port + i}",
                             {"component": "node", "hospital": hospital, "node": node})
                for i, (hospital, node) in enumerate(nodes)]
    if dashboard_port is not None:
        targets.append(ScrapeTarget("dashboard", f"127.0.0.1:{dashboard_port}", {"component": "dashboard"}))
    return targets


def compose_targets(hospitals: list[str]) -> list[ScrapeTarget]:
    """docker-compose.yml's services, by service name (one node per hospital, named as its hospital)."""
    targets = [ScrapeTarget("aggregator", "aggregator:8081", {"component": "aggregator"})]
    targets += [ScrapeTarget("nodes", f"{hospital}:8001", {"component": "node", "hospital": hospital, "node": hospital})
                for hospital in hospitals]
    targets.append(ScrapeTarget("dashboard", "dashboard:7860", {"component": "dashboard"}))
    return targets


LOCAL_HEADER = ("# Prometheus for `make demo` (default ports), written by health_mlops.demo.prometheus.local_config;\n"
                "# `health-mlops demo` writes the same for the ports it uses. Run: prometheus "
                "--config.file=monitoring/prometheus-local.yml\n")
COMPOSE_HEADER = ("# Prometheus for docker-compose.yml, written by health_mlops.demo.prometheus.local_config from "
                  "compose_targets;\n# the compose file's prometheus service runs it (docker/Dockerfile, target "
                  "prometheus).\n")


def local_config(targets: list[ScrapeTarget], *, rule_files: list[str], interval_s: float = 5.0,
                 header: str = LOCAL_HEADER) -> str:
    """prometheus.yml text scraping `targets` every `interval_s` and evaluating `rule_files`."""
    jobs: dict[str, list[dict]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append({"targets": [target.address], "labels": target.labels})
    interval = f"{interval_s:g}s"
    config = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
              "rule_files": rule_files,
              "scrape_configs": [{"job_name": job, "static_configs": static} for job, static in jobs.items()]}
    return header + yaml.safe_dump(config, sort_keys=False, width=120)


def prometheus_command(config: Path, data_dir: Path, port: int) -> list[str] | None:
    """The command that runs Debian's prometheus on loopback, or None if it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        return None
    return [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=7d"]


def start_prometheus(processes: Processes, settings: Settings, ports: Ports, nodes: list[tuple[str, str]],
                     dashboard_port: int, prometheus_port: int, console: Console) -> str | None:
    """Write the demo's Prometheus config into `$HEALTH_MLOPS_HOME/prometheus` and start Prometheus on it,
    returning its URL; without the binary, say where the config is and go on (None)."""
    folder = settings.home / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    rules = settings.prometheus_rules or ALERT_RULES
    targets = local_targets(aggregator_port=ports.aggregator_ops, node_metrics_port=ports.node_metrics, nodes=nodes,
                            dashboard_port=dashboard_port)
    config.write_text(local_config(targets, rule_files=[str(rules.resolve())] if rules.is_file() else [],
                                   interval_s=settings.prometheus_scrape_interval_s), encoding="utf-8")
    command = prometheus_command(config, folder / "data", prometheus_port)
    if command is None:
        console.print(f"Prometheus is not installed (`apt-get install prometheus`); its config for this demo is "
                      f"{config}", soft_wrap=True)
        return None
    processes.start_program("prometheus", command)
    url = f"http://127.0.0.1:{prometheus_port}"
    console.print(f"Prometheus on {url} (alerts: /alerts; config {config})", soft_wrap=True)
    return url
