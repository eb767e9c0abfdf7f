"""The demo's federation: the aggregator and one node per hospital as processes (two replicas for hospital-1, to
show they count once), one run started with the admin credential and shown live as its rounds close, and the
dashboard served beside them afterwards."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from health_mlops.demo.processes import Child, Processes, check_ports_free, wait_ready
from health_mlops.errors import DemoError
from health_mlops.fl.client import AdminClient, RunRefused
from health_mlops.fl.messages import RunRequest, RunView
from health_mlops.fl.metadata import EvaluationMetadata


@dataclass(frozen=True)
class Ports:
    aggregator: int = 8080  # its API, over mutual TLS
    aggregator_ops: int = 8081  # its health and metrics
    node_api: int = 5001  # replica i listens on node_api + i
    node_metrics: int = 8001  # and exposes metrics on node_metrics + i

    def all_ports(self, replicas: int) -> list[int]:
        return [self.aggregator, self.aggregator_ops, *(self.node_api + i for i in range(replicas)),
                *(self.node_metrics + i for i in range(replicas))]


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


def node_status_urls(plan: list[NodePlan], ports: Ports) -> dict[str, str]:
    """Each replica's status page, where `run_federation` starts it (replica i's API on `ports.node_api` + i)."""
    return {p.node_id: f"http://127.0.0.1:{ports.node_api + i}/v1/status" for i, p in enumerate(plan)}


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
    # The replica whose result counted in the last closed round (the summary after the run lists every round's).
    for column in ("hospital", "task", "lease holder", f"last {metric.upper()}", "last round counted from"):
        hospitals.add_column(column)
    open_tasks = {t.hospital: t for t in run.open_tasks}
    last = run.history[-1] if fits else None
    for hospital_id in run.hospitals:
        task = open_tasks.get(hospital_id)
        sent = last.hospitals.get(hospital_id) if last else None
        value = sent.metrics.get(metric) if isinstance(sent, EvaluationMetadata) else None
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
    from health_mlops.trust.credentials import ADMIN, ClientCredential

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


DEMO_USER = "admin"


def demo_login(accounts: Path, credentials_dir: Path) -> tuple[str, Path]:
    """The demo's dashboard login: the admin user and the file holding its password, created with a random
    password the first time (a laptop's dashboard is no more open than a hospital's)."""
    from health_mlops.errors import CredentialError
    from health_mlops.system.files import write_private
    from health_mlops.trust.access import Accounts, set_user

    password_file = credentials_dir / f"dashboard-{DEMO_USER}.password"
    try:
        known = DEMO_USER in Accounts.load(accounts).users
    except CredentialError:
        known = False
    if not (known and password_file.exists()):
        password = secrets.token_urlsafe(12)
        set_user(accounts, DEMO_USER, "admin", password)
        write_private(password_file, password + "\n")
    return DEMO_USER, password_file


def serve_dashboard(processes: Processes, port: int, console: Console, *, prometheus_url: str | None,
                    node_status_urls: dict[str, str], login: tuple[str, Path]) -> None:
    """Serve the dashboard (a process, like every other component) beside the federation until Ctrl-C; it links
    to the demo's Prometheus when there is one, and to each node's status page."""
    env = {"HEALTH_MLOPS_NODE_STATUS_URLS": json.dumps(node_status_urls),
           **({"HEALTH_MLOPS_PROMETHEUS_URL": prometheus_url} if prometheus_url else {})}
    child = processes.start("dashboard", ["dashboard", "--port", str(port)], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", child)
        user, password_file = login
        console.print(f"dashboard on http://127.0.0.1:{port}: log in as {user}, password "
                      f"{password_file.read_text(encoding='utf-8').strip()} (kept in {password_file}; API keys: "
                      f"`health-mlops dashboard-account key`; log: {child.log_path}); the aggregator and nodes keep "
                      "running; Ctrl-C stops everything", soft_wrap=True, markup=False)
        child.process.wait()
    except KeyboardInterrupt:
        console.print("stopped")
