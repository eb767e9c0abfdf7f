"""Debian's prometheus beside the demo, scraping every process with the alert rules, if it is installed."""

from __future__ import annotations

from rich.console import Console

from health_mlops.config import Settings
from health_mlops.demo.federation import Ports
from health_mlops.demo.processes import Processes
from health_mlops.prometheus import ALERT_RULES, local_config, local_targets, prometheus_command


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
