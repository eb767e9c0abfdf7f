"""The federation as it is deployed: an aggregator process and node processes talking HTTP on loopback.

Each test starts its own processes with their own state folder, and kills some of them on purpose.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from health_mlops.data.hospital import load_hospital
from health_mlops.data.split import HospitalSplit, hold_out_validation, split_hospitals
from health_mlops.demo.processes import Child, wait_ready
from health_mlops.fl.client import HospitalClient
from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.messages import RunView, TaskMessage, decode_weights, encode_result
from health_mlops.fl.metadata import FitMetadata
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import ADMIN, ClientCredential, bearer, provision, read_token, token_path
from health_mlops.trust.pki import CA, cert_path, key_path
from health_mlops.trust.tls import client_context
from tests.conftest import free_port_range, run_cli_json, with_empty_mlflow_db
from tests.forked_cli import ForkedProcesses

pytestmark = pytest.mark.process

SPEC = load_spec("health-risk")
HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]


class Cluster:
    """An aggregator (API over mutual TLS, operations port) and nodes as real processes, plus an admin client."""

    def __init__(self, home: Path, data: Path, empty_mlflow_db: Path) -> None:
        self.home, self.data = with_empty_mlflow_db(home, empty_mlflow_db), data
        self.base = free_port_range(20)
        self.central = f"https://127.0.0.1:{self.base}"
        self.ops = f"http://127.0.0.1:{self.base + 19}"
        self.credentials = home / "credentials"
        provision(self.credentials, HOSPITALS)
        self.processes = ForkedProcesses(home / "logs", {**os.environ, "HEALTH_MLOPS_HOME": str(home)})
        self.nodes: dict[str, Child] = {}
        self.node_ports: dict[str, tuple[int, int]] = {}  # node -> (API port, metrics port)
        admin_tls = client_context(cert_path(self.credentials, ADMIN), key_path(self.credentials, ADMIN),
                                   cert_path(self.credentials, CA))
        self.admin = httpx.Client(base_url=self.central, timeout=30, verify=admin_tls,
                                  headers=bearer(read_token(token_path(self.credentials, ADMIN))))

    def start_aggregator(self, *, crash_at: str | None = None) -> Child:
        """The aggregator; `crash_at`: the crash point (system/faults.py) at which it kills itself."""
        child = self.processes.start(f"aggregator-{len(self.processes.children)}",
                                     ["aggregator", "--port", str(self.base), "--ops-port", str(self.base + 19)],
                                     env={"HEALTH_MLOPS_CRASH_AT": crash_at} if crash_at else None)
        wait_ready(f"{self.ops}/readyz", child)
        self.aggregator = child
        return child

    def start_node(self, hospital: str, node_id: str, *, central_url: str | None = None) -> Child:
        """A node process; `central_url`: where it finds the aggregator, if not directly."""
        index = len(self.nodes) + 1
        child = self.processes.start(node_id, [
            "node", "--hospital-id", hospital, "--node-id", node_id, "--data-dir", str(self.data / hospital),
            "--central-url", central_url or self.central, "--api-port", str(self.base + index),
            "--metrics-port", str(self.base + 10 + index)])
        wait_ready(f"http://127.0.0.1:{self.base + index}/readyz", child)
        self.nodes[node_id] = child
        self.node_ports[node_id] = (self.base + index, self.base + 10 + index)
        return child

    def start_run(self, **config: object) -> str:
        body = {"config": {"rounds": 4, "local_epochs": 2, "min_hospitals": 3, "lease_s": 3, **config}}
        response = self.admin.post("/v1/runs", json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def view(self, run_id: str) -> RunView:
        return RunView.model_validate(self.admin.get(f"/v1/runs/{run_id}").raise_for_status().json())

    def wait_for(self, run_id: str, condition: Callable[[RunView], bool], timeout_s: float = 120) -> RunView:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view = self.view(run_id)
            if condition(view):
                return view
            assert view.status in ("running", "completed"), f"run ended {view.status}: {view.reason}"
            time.sleep(0.05)
        raise AssertionError(f"timed out; last view: round {view.round}, status {view.status}")

    def final_auc(self, view: RunView) -> float:
        assert view.status == "completed", view.reason
        assert view.history[-1].kind is TaskKind.evaluate
        return view.history[-1].global_metrics["auc"]


@pytest.fixture
def cluster(tmp_path: Path, data: Path, empty_mlflow_db: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "home", data, empty_mlflow_db)
    try:
        yield cluster
    finally:
        cluster.admin.close()
        cluster.processes.stop_all()


def start_standard_nodes(cluster: Cluster) -> None:
    cluster.start_node("hospital-1", "hospital-1-a")
    cluster.start_node("hospital-1", "hospital-1-b")
    cluster.start_node("hospital-2", "hospital-2-a")
    cluster.start_node("hospital-3", "hospital-3-a")


def assert_each_hospital_counted_once_per_round(view: RunView, train_rows: dict[str, int]) -> None:
    assert [r.round for r in view.history] == list(range(view.final_round + 1))  # no round applied twice
    for record in view.history:
        assert sorted(record.hospitals) == HOSPITALS
        if record.kind is TaskKind.fit:
            for hospital, metadata in record.hospitals.items():
                assert isinstance(metadata, FitMetadata)
                assert metadata.num_examples == train_rows[hospital]  # one replica's rows, not two


def training_splits(data: Path) -> list[HospitalSplit]:
    hospitals = {h: load_hospital(data / h, SPEC) for h in HOSPITALS}
    return split_hospitals(hospitals, SPEC, seed=42, test_fraction=0.2)


def train_rows(data: Path) -> dict[str, int]:
    """Each hospital's rows a fit trains on: its training rows but the validation part it holds out."""
    fraction = RunConfig().validation_fraction
    return {s.hospital_id: len(hold_out_validation(s.train, SPEC, s.hospital_id, fraction=fraction)[0])
            for s in training_splits(data)}


def test_aggregator_killed_mid_run_resumes_at_the_last_closed_round(cluster: Cluster, data: Path) -> None:
    cluster.start_aggregator()
    start_standard_nodes(cluster)
    undisturbed = cluster.wait_for(cluster.start_run(seed=5), lambda v: v.status != "running")
    # Registered before the kill: a kill between MLflow's registration and its record is "Federation at scale"'s.
    first = cluster.wait_for(undisturbed.id, lambda v: (v.model or {}).get("status") not in (None, "registering"))

    run_id = cluster.start_run(seed=5)
    before = cluster.wait_for(run_id, lambda v: v.round >= 3)
    cluster.aggregator.process.send_signal(signal.SIGKILL)
    cluster.aggregator.process.wait()
    cluster.start_aggregator()
    resumed = cluster.view(run_id)
    # Picked up where the checkpoint left it, not from round 0. A view may run one round ahead of the disk (a
    # round's closing is durable once its checkpoint is written, and the kill may land just before that), and the
    # run may close more rounds between that view and the kill.
    assert resumed.round >= before.round - 1
    common = min(len(resumed.history), len(before.history))
    assert [r.round for r in resumed.history][:common] == [r.round for r in before.history][:common]
    final = cluster.wait_for(run_id, lambda v: v.status != "running")

    assert_each_hospital_counted_once_per_round(final, train_rows(data))
    assert abs(cluster.final_auc(final) - cluster.final_auc(undisturbed)) <= 0.005
    assert {r.nodes["hospital-1"] for r in undisturbed.history} <= {"hospital-1-a", "hospital-1-b"}

    # The first model is registered as champion. The second run trained as the first did (same code, task, settings,
    # data and participation: the kill changed none of them), so it is the same model: no second version.
    second = cluster.wait_for(run_id, lambda v: (v.model or {}).get("status") not in (None, "registering"))
    assert first.model is not None and second.model is not None
    assert (first.model.get("status"), first.model.get("version")) == ("registered", 1), first.model
    assert (second.model.get("status"), second.model.get("version")) == ("unchanged", 1), second.model
    assert second.model["federation_run"] == undisturbed.id
    assert first.model["metric"] == pytest.approx(cluster.final_auc(undisturbed))
    versions = run_cli_json("registry", "list", home=cluster.home)
    assert [(v["version"], v["aliases"]) for v in versions] == [(1, ["champion"])]


def stop_hospital_1s_holder_until_taken_over(cluster: Cluster, run_id: str) -> tuple[int, str, str]:
    """Stop (SIGSTOP: no result, no heartbeat) the replica computing hospital-1's task of a fit round, until the other
    replica holds that task or delivered it: (the round, the stopped replica, the other). A result already on its
    way when its replica stopped may still count; then that replica resumes and the next round is tried."""
    while True:
        view = cluster.wait_for(run_id, lambda v: v.round >= 1 and any(
            t.hospital == "hospital-1" and t.status == "leased" and t.holder for t in v.open_tasks))
        stopped_round = view.round
        stopped = next(t.holder for t in view.open_tasks if t.hospital == "hospital-1")
        assert stopped is not None
        other = "hospital-1-b" if stopped == "hospital-1-a" else "hospital-1-a"
        cluster.nodes[stopped].process.send_signal(signal.SIGSTOP)
        taken = cluster.wait_for(run_id, lambda v, r=stopped_round, o=other: v.round > r or any(
            t.hospital == "hospital-1" and t.holder == o for t in v.open_tasks), timeout_s=180)
        if taken.round == stopped_round or taken.history[stopped_round].nodes["hospital-1"] == other:
            return stopped_round, stopped, other
        cluster.nodes[stopped].process.send_signal(signal.SIGCONT)
        assert taken.round < taken.config.rounds, "each round's result got in before its replica could be stopped"


def test_node_replica_killed_mid_round_is_replaced_by_the_other(cluster: Cluster, data: Path) -> None:
    cluster.start_aggregator()
    start_standard_nodes(cluster)
    run_id = cluster.start_run(local_epochs=40, lease_s=1.5)  # long enough to be caught computing
    killed_round, holder, survivor = stop_hospital_1s_holder_until_taken_over(cluster, run_id)
    cluster.nodes[holder].process.send_signal(signal.SIGKILL)

    final = cluster.wait_for(run_id, lambda v: v.status != "running", timeout_s=180)
    assert final.status == "completed"
    record = next(r for r in final.history if r.round == killed_round)
    assert record.nodes["hospital-1"] == survivor
    assert {r.nodes["hospital-1"] for r in final.history if r.round > killed_round} == {survivor}
    assert_each_hospital_counted_once_per_round(final, train_rows(data))

    api_port, metrics_port = cluster.node_ports[survivor]
    # The run completes when the aggregator accepts the last evaluation; the node records its task once it has
    # read that answer, a moment later (one CI run read the status in between).
    deadline = time.monotonic() + 60
    while ((status := httpx.get(f"http://127.0.0.1:{api_port}/v1/status").json())["last_task"] or {}).get(
            "kind") != "evaluate":
        assert time.monotonic() < deadline, f"the survivor never recorded its evaluation: {status['last_task']}"
        time.sleep(0.1)
    assert status["hospital"] == "hospital-1" and status["node"] == survivor and status["central_reachable"]
    assert status["data"]["rows_valid"] == 1500 and status["data"]["rows_train"] == len(training_splits(data)[0].train)
    assert status["results_sent_by_kind"]["fit"] >= final.config.rounds - killed_round + 1
    assert status["last_task"]["kind"] == "evaluate" and status["last_task"]["outcome"] == "succeeded"
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'health_mlops_node_tasks_total{hospital="hospital-1",kind="fit",outcome="succeeded"}' in metrics
    assert 'health_mlops_data_rows{hospital="hospital-1",status="valid"} 1500.0' in metrics


def test_invalid_updates_are_refused_with_a_reason_and_the_round_closes_without_them(cluster: Cluster,
                                                                                     data: Path) -> None:
    cluster.start_aggregator()
    cluster.start_node("hospital-1", "hospital-1-a")
    cluster.start_node("hospital-2", "hospital-2-a")
    # This test plays hospital-3, without heartbeats: a lease that outlasts its slowest step on a loaded machine.
    run_id = cluster.start_run(min_hospitals=2, lease_s=600, round_deadline_s=1200)
    # Honest stats, then a NaN update, a wrongly shaped one, then an honest one.
    hospital = load_hospital(data / "hospital-3", SPEC)
    split = split_hospitals({"hospital-3": hospital}, SPEC, seed=42, test_fraction=0.2)[0]
    worker = HospitalWorker("hospital-3", SPEC, split.train, split.test)
    bad_node = HospitalClient(cluster.central, ClientCredential.from_directory(cluster.credentials, "hospital-3"),
                              node_id="hospital-3-test", poll_wait_s=2)

    def next_task() -> TaskMessage:
        deadline = time.monotonic() + 120
        while (task := bad_node.next_task()) is None:
            assert time.monotonic() < deadline, "no task for hospital-3"
        return task

    def honest(task: TaskMessage) -> TaskResult:
        weights = {} if task.weights_path is None else decode_weights(bad_node.weights(task.weights_path))[0]
        return worker.handle(task.kind, task.config, weights, task.preprocessing, task.round)

    def submit(task: TaskMessage, result: TaskResult) -> httpx.Response:
        return bad_node.submit_result(task.id, encode_result(result, task.id))

    stats = next_task()
    assert submit(stats, honest(stats)).status_code == 200
    refusals = {}
    for corrupt in ("non_finite", "wrong_shape"):
        task = next_task()
        result = honest(task)
        name = sorted(result.tensors)[0]
        if corrupt == "non_finite":
            result.tensors[name] = np.full_like(result.tensors[name], np.nan)
        else:
            result.tensors[name] = np.zeros((3, 3), dtype=np.float32)
        response = submit(task, result)
        assert response.status_code == 422
        refusals[corrupt] = response.json()["reason"]
        view = cluster.wait_for(run_id, lambda v, r=task.round: v.round > r)  # closed without hospital-3
        assert sorted(view.history[task.round].hospitals) == ["hospital-1", "hospital-2"]
    assert refusals == {"non_finite": "non_finite", "wrong_shape": "wrong_shape"}
    unreadable = next_task()
    response = bad_node.submit_result(unreadable.id, b"not safetensors")
    assert response.status_code == 422 and response.json()["reason"] == "unreadable"
    assert submit(unreadable, honest(unreadable)).status_code == 200  # still leased, so a good result counts
    while (view := cluster.view(run_id)).status == "running":
        if (task := bad_node.next_task()) is not None:
            assert submit(task, honest(task)).status_code == 200
    bad_node.close()

    assert view.status == "completed"
    assert view.rejected == {"non_finite": 1, "wrong_shape": 1}
    metrics = httpx.get(f"{cluster.ops}/metrics").text
    assert 'health_mlops_updates_rejected_total{reason="non_finite"} 1.0' in metrics
    assert 'health_mlops_updates_rejected_total{reason="wrong_shape"} 1.0' in metrics


def test_a_node_with_another_hospitals_token_refuses_to_serve(cluster: Cluster, data: Path) -> None:
    cluster.start_aggregator()
    api = cluster.base + 1
    child = cluster.processes.start("mismatched", [
        "node", "--hospital-id", "hospital-1", "--node-id", "mismatched", "--data-dir", str(data / "hospital-1"),
        "--token-file", str(token_path(cluster.home / "credentials", "hospital-2")), "--central-url",
        cluster.central, "--api-port", str(api), "--metrics-port", str(cluster.base + 11)])
    deadline = time.monotonic() + 60
    while True:
        try:
            status = httpx.get(f"http://127.0.0.1:{api}/v1/status").json()
            if status["fatal"]:
                break
        except httpx.TransportError:
            pass
        assert child.process.poll() is None and time.monotonic() < deadline, child.log_tail()
        time.sleep(0.1)
    assert "hospital-2" in status["fatal"]
    assert httpx.get(f"http://127.0.0.1:{api}/readyz").status_code == 503


def test_a_hospital_without_valid_rows_is_left_out_with_its_reason_and_nothing_answers_500(
        tmp_path: Path, data: Path, empty_mlflow_db: Path) -> None:
    copied = tmp_path / "data"
    shutil.copytree(data, copied)
    csv = copied / "hospital-3" / "patient_days.csv"
    lines = csv.read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    column = header.index("heart_rate")
    rows = [line.split(",") for line in lines[1:]]
    for row in rows:
        row[column] = "999"  # out of range: every row is quarantined
    csv.write_text("\n".join([lines[0], *(",".join(r) for r in rows)]) + "\n", encoding="utf-8")
    cluster = Cluster(tmp_path / "home", copied, empty_mlflow_db)
    try:
        cluster.start_aggregator()
        for hospital in HOSPITALS:
            cluster.start_node(hospital, f"{hospital}-a")
        run_id = cluster.start_run(rounds=2, local_epochs=1, min_hospitals=2, lease_s=30)
        final = cluster.wait_for(run_id, lambda v: v.status != "running")
        assert final.status == "completed", final.reason
        assert final.excluded == {"hospital-3": "no valid training rows (0 counted in round 0)"}
        assert all(sorted(r.hospitals) == ["hospital-1", "hospital-2"] for r in final.history[1:])
        api_port, _ = cluster.node_ports["hospital-3-a"]
        status = httpx.get(f"http://127.0.0.1:{api_port}/v1/status").json()
        assert status["data"]["rows_train"] == 0 and status["data"]["rows_quarantined"] == 1500
        assert "no valid training rows" in cluster.nodes["hospital-3-a"].log_tail(50)
        assert " 500 " not in cluster.aggregator.log_tail(200) and "Traceback" not in cluster.aggregator.log_tail(200)
    finally:
        cluster.admin.close()
        cluster.processes.stop_all()


def test_a_replica_paused_past_its_lease_gets_409_for_its_late_result(cluster: Cluster, data: Path) -> None:
    cluster.start_aggregator()
    start_standard_nodes(cluster)
    run_id = cluster.start_run(local_epochs=30, lease_s=2)  # long enough to be caught computing
    try:  # no heartbeats: its lease runs out
        paused_round, paused, other = stop_hospital_1s_holder_until_taken_over(cluster, run_id)
        after = cluster.wait_for(run_id, lambda v: v.round > paused_round or v.status != "running", timeout_s=180)
    finally:
        for node in ("hospital-1-a", "hospital-1-b"):
            cluster.nodes[node].process.send_signal(signal.SIGCONT)
    assert next(r for r in after.history if r.round == paused_round).nodes["hospital-1"] == other

    api_port, _ = cluster.node_ports[paused]
    deadline = time.monotonic() + 180
    own = bearer(read_token(token_path(cluster.credentials, "hospital-1")))  # what it sent: its hospital's to see
    while (status := httpx.get(f"http://127.0.0.1:{api_port}/v1/status", headers=own, timeout=10).json())[
            "tasks_by_outcome"].get("conflict", 0) == 0:
        assert time.monotonic() < deadline, f"the paused replica's late result was not refused: {status}"
        time.sleep(0.2)
    late = [e for e in status["sent"]["log"] if e["path"].endswith(f".r{paused_round}.a0.hospital-1/result")]
    assert late, "the late result was never sent"
    final = cluster.wait_for(run_id, lambda v: v.status != "running", timeout_s=180)
    assert final.status == "completed"
    assert_each_hospital_counted_once_per_round(final, train_rows(data))
