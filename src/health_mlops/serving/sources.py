"""What the dashboard shows about training and hospitals, and where it comes from.

Live state comes from the aggregator's API (the dashboard holds the admin token, as in Kubernetes where both
run in `central`). When the aggregator cannot be reached, completed runs still come from the MLflow registry,
where every registered run logged its per-round metrics; hospitals then show what that run recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from health_mlops.errors import TlsError
from health_mlops.fl.client import AdminClient
from health_mlops.registry import EXPERIMENT_NAME, Registry
from health_mlops.trust.credentials import ClientCredential

log = logging.getLogger("health_mlops.dashboard")
RUNS_FROM_REGISTRY = 5
LIVE_TTL_S = 1.0  # every open dashboard polls; the aggregator is asked at most once a second
REGISTRY_TTL_S = 15.0  # completed runs change rarely, and reading them costs dozens of queries
AGGREGATOR_TIMEOUT_S = 3.0  # a page waits no longer for the live view before falling back to the registry


@dataclass
class TrainingRun:
    id: str
    status: str
    global_metric: list[tuple[int, float]]  # (round, example-weighted metric of the model entering it)
    hospital_metric: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None  # the run view's privacy (budget and ε spent), with DP
    hospital_loss: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # (round, local training loss)
    participation: list[tuple[int, list[str]]] = field(default_factory=list)  # (round, hospitals that counted)
    enrolled: list[str] = field(default_factory=list)
    secure_aggregation: bool = False  # the aggregator saw only sums of the hospitals' updates


@dataclass
class HospitalStatus:
    hospital: str
    status: str
    rows: int | None  # rows the hospital trained on (counted in round 0)
    rows_quarantined: int | None
    last_round: int | None
    metric: float | None  # its latest evaluation of the global model
    suppressed: dict[str, int] | None = None  # cells its round-0 stats withheld as too small
    epsilon: float | None = None  # privacy spent so far, in a run with differential privacy
    replicas: list[str] = field(default_factory=list)  # its nodes the aggregator has seen (results, open task)
    last_heartbeat: float | None = None  # Unix time its open task's lease was last renewed


@dataclass
class FederationState:
    source: str  # "aggregator <url>" or "registry (aggregator not reachable: …)"
    runs: list[TrainingRun]
    hospitals: list[HospitalStatus]


def runs_from_views(views: list[dict[str, Any]], metric: str) -> list[TrainingRun]:
    """Training curves of the aggregator's run views (skipping round 0, which only counts rows)."""
    runs = []
    for view in views:
        rounds = [r for r in view["history"] if r["kind"] != "stats"]
        curve = [(r["round"], r["global_metrics"][metric]) for r in rounds if metric in r["global_metrics"]]
        per_hospital: dict[str, list[tuple[int, float]]] = {h: [] for h in view["hospitals"]}
        losses: dict[str, list[tuple[int, float]]] = {h: [] for h in view["hospitals"]}
        for r in rounds:
            for hospital, metadata in r["hospitals"].items():
                value = (metadata.get("metrics") or {}).get(metric)
                if value is not None:
                    per_hospital.setdefault(hospital, []).append((r["round"], value))
                if metadata.get("train_loss") is not None:
                    losses.setdefault(hospital, []).append((r["round"], float(metadata["train_loss"])))
        participation = [(r["round"], sorted(r["hospitals"])) for r in view["history"]]
        runs.append(TrainingRun(view["id"], view["status"], curve, per_hospital, view.get("privacy"), losses,
                                participation, list(view["hospitals"]),
                                bool(view["config"].get("secure_aggregation"))))
    return runs


def hospitals_from_view(view: dict[str, Any], metric: str) -> list[HospitalStatus]:
    """Each hospital of a run: what it is doing now, its data, the last round it reported."""
    open_tasks = {t["hospital"]: t for t in view["open_tasks"]}
    stats = next((r for r in view["history"] if r["kind"] == "stats"), None)
    found = []
    for hospital in view["hospitals"]:
        reported = [r for r in view["history"] if hospital in r["hospitals"]]
        last = reported[-1] if reported else None
        task = open_tasks.get(hospital)
        if hospital in (view.get("excluded") or {}):
            status = f"left out: {view['excluded'][hospital]}"
        elif view["status"] != "running":
            status = f"idle (run {view['status']})"
        elif task is None:
            status = "done for this round"
        elif task["holder"]:
            status = f"working ({task['holder']})"
        else:
            status = "waiting for a node to take its task"
        counted = stats["hospitals"].get(hospital) if stats else None
        spent = ((view.get("privacy") or {}).get("hospitals") or {}).get(hospital)
        replicas = {r["nodes"][hospital] for r in view["history"] if hospital in r.get("nodes", {})}
        if task is not None and task["holder"]:
            replicas.add(task["holder"])
        # A lease runs lease_s from its last renewal (taking the task, or a heartbeat).
        heartbeat = (task["lease_expires"] - view["config"]["lease_s"]
                     if task is not None and task["holder"] else None)
        found.append(HospitalStatus(
            hospital, status, counted.get("count") if counted else None,
            counted.get("rows_quarantined") if counted else None, last["round"] if last else None,
            ((last["hospitals"][hospital].get("metrics") or {}).get(metric)) if last else None,
            (view.get("suppressed") or {}).get(hospital), spent["epsilon"] if spent else None, sorted(replicas),
            heartbeat))
    return found


class DashboardSources:
    def __init__(self, registry: Registry, metric: str, aggregator_url: str | None,
                 admin: ClientCredential | None) -> None:
        self.registry = registry
        self.metric = metric
        self.aggregator_url = aggregator_url
        self.admin = admin
        self._lock = threading.Lock()
        self._cached: tuple[float, FederationState] | None = None
        # One client, kept: its TLS context and kept-alive connection serve every look (a new one each second
        # would repeat the handshake); dropped after a failure, so the next look starts afresh.
        self._client: AdminClient | None = None

    def federation(self) -> FederationState:
        """The current state, shared by every open dashboard for a short while."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now < self._cached[0]:
                return self._cached[1]
            state = self._look()
            ttl = LIVE_TTL_S if state.source.startswith("aggregator") else REGISTRY_TTL_S
            self._cached = (now + ttl, state)
            return state

    def _look(self) -> FederationState:
        problem = "no aggregator configured"
        if self.aggregator_url and self.admin:
            try:
                if self._client is None:
                    self._client = AdminClient(self.aggregator_url, self.admin, timeout_s=AGGREGATOR_TIMEOUT_S)
                views = sorted(self._client.runs(), key=lambda v: v["id"])
                return FederationState(f"aggregator {self.aggregator_url}", runs_from_views(views, self.metric),
                                       hospitals_from_view(views[-1], self.metric) if views else [])
            except TlsError as error:
                problem = str(error)
            except (httpx.HTTPError, ValueError, KeyError) as error:
                problem = f"aggregator not reachable: {type(error).__name__}"
            self.close()
        elif self.aggregator_url:
            problem = "no admin token for the aggregator"
        runs = self.runs_from_registry()
        hospitals = [HospitalStatus(h, "unknown (no live view)", None, None, curve[-1][0], curve[-1][1])
                     for h, curve in runs[-1].hospital_metric.items() if curve] if runs else []
        return FederationState(f"registry ({problem})", runs, hospitals)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def runs_from_registry(self) -> list[TrainingRun]:
        """The last completed runs the registry logged, oldest first."""
        client = self.registry.client
        try:
            experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
            if experiment is None:
                return []
            found = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                       max_results=RUNS_FROM_REGISTRY)
        except Exception as error:  # noqa: BLE001 - the registry may be away; the dashboard keeps working
            log.warning("cannot read runs from the registry: %s", error)
            return []
        runs = []
        for run in reversed(found):
            keys = [k for k in run.data.metrics if k.endswith(f".{self.metric}") and not k.startswith("final.")]
            curves = {k.rsplit(".", 1)[0]: sorted((int(m.step), float(m.value))
                                                  for m in client.get_metric_history(run.info.run_id, k))
                      for k in keys}
            runs.append(TrainingRun(run.data.tags.get("federation_run", run.info.run_id), "completed",
                                    curves.pop("global", []), dict(sorted(curves.items())),
                                    secure_aggregation=run.data.params.get("secure_aggregation") == "True"))
        return runs
