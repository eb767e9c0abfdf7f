"""`health-mlops demo`: the whole federation on loopback, every component its own process, trained live.

It starts the aggregator and one node per hospital (two replicas for hospital-1, to show they count once),
starts a run with the admin credential, shows the rounds as they close, then compares the federated model
with pooled training, local-only training and the Bayes-optimal score. Every process it started is stopped
on the way out, Ctrl-C included; their logs stay in `$HEALTH_MLOPS_HOME/logs`.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from health_mlops.fl.client import AdminClient, RunRefused
from health_mlops.fl.messages import RunRequest, RunView

READY_TIMEOUT_S = 60.0


class DemoError(Exception):
    """Something the demo cannot get past; the message says what and where to look."""


@dataclass(frozen=True)
class Ports:
    aggregator: int = 8080  # its API, over mutual TLS
    aggregator_ops: int = 8081  # its health and metrics
    node_api: int = 5001  # replica i listens on node_api + i
    node_metrics: int = 8001  # and exposes metrics on node_metrics + i

    def all_ports(self, replicas: int) -> list[int]:
        return [self.aggregator, self.aggregator_ops, *(self.node_api + i for i in range(replicas)),
                *(self.node_metrics + i for i in range(replicas))]


def check_ports_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise DemoError(f"port {port} on 127.0.0.1 is in use; choose other ports (see --help)") from None


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def log_tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Processes:
    """Child processes of the demo, each in its own session (so Ctrl-C reaches the demo, which stops them in
    order) with its output in a log file."""

    log_dir: Path
    env: dict[str, str]
    children: dict[str, Child] = field(default_factory=dict)

    def start(self, name: str, args: list[str], *, env: Mapping[str, str] | None = None) -> Child:
        """`health-mlops <args>` as a child (with `env` added to the environment)."""
        return self.start_program(name, [sys.executable, "-m", "health_mlops.cli", *args], env=env)

    def start_program(self, name: str, command: list[str], *, env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                       start_new_session=True)
        except OSError:
            log.close()
            raise
        self.children[name] = Child(name, process, log_path, log)
        return self.children[name]

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child, SIGKILL what is left after `grace_s`; a second Ctrl-C only hastens the kill."""
        try:
            for child in self.children.values():
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in self.children.values():
                try:
                    child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for child in self.children.values():
                if child.process.poll() is None:
                    child.process.kill()
                    child.process.wait()
                child.log.close()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()


def wait_ready(url: str, child: Child, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise DemoError(f"{child.name} exited with code {child.process.returncode}; the end of "
                            f"{child.log_path}:\n{child.log_tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise DemoError(f"{child.name} was not ready at {url} after {timeout_s:.0f} s; see {child.log_path}")


@dataclass(frozen=True)
class NodePlan:
    hospital_id: str
    node_id: str
    city: str
    data_dir: Path


def node_plan(data: Path, hospitals: list[str], cities: dict[str, str]) -> list[NodePlan]:
    """One replica per hospital, two for the first (they must count once)."""
    plan = []
    for index, hospital_id in enumerate(hospitals):
        for replica in ("a", "b") if index == 0 else ("a",):
            plan.append(NodePlan(hospital_id, f"{hospital_id}-{replica}", cities.get(hospital_id, ""),
                                 data / hospital_id))
    return plan


def live_view(run: RunView, metric: str) -> Group:
    """The training as it happens: one line per closed round, then each hospital's state."""
    fits = [h for h in run.history if h.kind.value != "stats"]
    header = Text.assemble(("run ", "dim"), run.id, ("  round ", "dim"), f"{run.round}/{run.final_round}",
                           ("  status ", "dim"), run.status)
    rounds = Table(box=None, padding=(0, 1), show_edge=False)
    # Each round first evaluates the model it receives, so round r scores the model after round r-1.
    for column in ("round", "kind", "hospitals", f"mean hospital {metric.upper()}", "seconds"):
        rounds.add_column(column, justify="right")
    for record in fits[-8:]:
        value = record.global_metrics.get(metric)
        rounds.add_row(str(record.round), record.kind.value, str(len(record.hospitals)),
                       "" if value is None else f"{value:.3f}", f"{record.closed_at - record.opened_at:.2f}")
    hospitals = Table(box=None, padding=(0, 1), show_edge=False)
    for column in ("hospital", "task", "lease holder", f"last {metric.upper()}", "counted from"):
        hospitals.add_column(column)
    open_tasks = {t.hospital: t for t in run.open_tasks}
    last = run.history[-1] if fits else None
    for hospital_id in run.hospitals:
        task = open_tasks.get(hospital_id)
        value = (last.hospitals.get(hospital_id, {}).get("metrics", {}).get(metric) if last else None)
        hospitals.add_row(hospital_id, task.status if task else "-", (task.holder or "-") if task else "-",
                          "" if value is None else f"{value:.3f}", last.nodes.get(hospital_id, "-") if last else "-")
    return Group(header, rounds, hospitals)


def follow_run(admin: AdminClient, run_id: str, on_view: Callable[[RunView], None],
               aggregator: Child) -> RunView:
    while True:
        if aggregator.process.poll() is not None:
            raise DemoError(f"the aggregator exited; the end of {aggregator.log_path}:\n{aggregator.log_tail()}")
        view = admin.run(run_id)
        on_view(view)
        if view.status != "running":
            return view
        time.sleep(0.2)


def wait_for_registration(admin: AdminClient, view: RunView, aggregator: Child,
                          timeout_s: float = 120.0) -> RunView:
    deadline = time.monotonic() + timeout_s
    while view.model is None or view.model.get("status") == "registering":
        if time.monotonic() > deadline or aggregator.process.poll() is not None:
            raise DemoError(f"the model of {view.id} was not registered; see {aggregator.log_path}")
        time.sleep(0.2)
        view = admin.run(view.id)
    return view


def cancel_stale_runs(admin: AdminClient, console: Console) -> None:
    """A demo interrupted earlier leaves its run in the checkpoint; it would take the nodes' time first."""
    for raw in admin.runs():
        if raw["status"] == "running":
            admin.cancel(raw["id"])
            console.print(f"cancelled {raw['id']}, left running by an earlier demo")


def run_federation(processes: Processes, *, data: Path, hospitals: list[str], cities: dict[str, str],
                   request: RunRequest, home: Path, credentials_dir: Path, ports: Ports, metric: str,
                   console: Console, plan: list[NodePlan] | None = None) -> tuple[RunView, bytes]:
    """Start the aggregator and every node in `processes` (`plan`, by default `node_plan`'s), train one run live,
    and return its final view and the final global weights. The processes keep running (the caller's
    `Processes` stops them)."""
    from health_mlops.security import ADMIN, ClientCredential

    plan = plan if plan is not None else node_plan(data, hospitals, cities)
    check_ports_free(ports.all_ports(len(plan)))
    central = f"https://127.0.0.1:{ports.aggregator}"
    aggregator = processes.start("aggregator", ["aggregator", "--port", str(ports.aggregator),
                                                "--ops-port", str(ports.aggregator_ops)])
    nodes = [processes.start(p.node_id, ["node", "--hospital-id", p.hospital_id, "--node-id", p.node_id,
                                         "--city", p.city, "--data-dir", str(p.data_dir), "--central-url",
                                         central, "--api-port", str(ports.node_api + i),
                                         "--metrics-port", str(ports.node_metrics + i)])
             for i, p in enumerate(plan)]
    with console.status(f"starting the aggregator and {len(nodes)} nodes (logs in {home / 'logs'})"):
        wait_ready(f"http://127.0.0.1:{ports.aggregator_ops}/readyz", aggregator)
        for i, child in enumerate(nodes):
            wait_ready(f"http://127.0.0.1:{ports.node_api + i}/readyz", child)
    with AdminClient(central, ClientCredential.from_directory(credentials_dir, ADMIN)) as admin:
        cancel_stale_runs(admin, console)
        try:
            run_id = admin.start_run(request).id
        except RunRefused as refused:
            raise DemoError(str(refused)) from None
        with Live(console=console, refresh_per_second=8, transient=False) as live:
            view = follow_run(admin, run_id, lambda v: live.update(live_view(v, metric)), aggregator)
        if view.status != "completed":
            raise DemoError(f"the run ended {view.status}: {view.reason}; logs in {home / 'logs'}")
        with console.status("registering the model (ONNX export, MLflow registry, quality gate)"):
            view = wait_for_registration(admin, view, aggregator)
        weights = admin.round_weights(run_id, view.final_round)
    return view, weights
