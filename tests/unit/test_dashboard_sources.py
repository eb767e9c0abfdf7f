"""What the dashboard makes of the aggregator's run views: curves per round and hospital, hospital status."""

from __future__ import annotations

from pathlib import Path

import pytest

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.aggregator import AggregatorService
from health_mlops.fl.run_config import PrivacyConfig, RunConfig
from health_mlops.fl.store import CheckpointStore
from health_mlops.serving.sources import hospitals_from_view, runs_from_views
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import Gatekeeper, provision

SPEC = load_spec("health-risk")


def completed_view(root: Path, config: RunConfig) -> dict:
    """A completed three-hospital run as `GET /v1/runs` shows it."""
    generate_dataset(root / "data", n_hospitals=3, rows_per_hospital=1000, seed=5, split_seed=42, test_fraction=0.2)
    splits = split_hospitals(load_hospitals(root / "data", SPEC), SPEC, seed=42, test_fraction=0.2)
    _, run = run_federated_in_memory(SPEC, splits, config)
    provision(root / "credentials", [])
    gatekeeper = Gatekeeper(root / "credentials", require_certificate=False)
    service = AggregatorService(SPEC, CheckpointStore(root / "models"), gatekeeper)
    return service.view(run).model_dump(mode="json")


HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return completed_view(tmp_path_factory.mktemp("sources"), RunConfig(rounds=2, local_epochs=1))


def test_a_private_runs_budget_and_each_hospitals_epsilon_and_suppressed_cells_are_shown(tmp_path: Path) -> None:
    config = RunConfig(rounds=1, batch_size=128, privacy=PrivacyConfig(epsilon=2.0))
    private = completed_view(tmp_path, config)
    (run,) = runs_from_views([private], "auc")
    assert run.privacy is not None and run.privacy["budget_epsilon"] == 2.0
    hospitals = hospitals_from_view(private, "auc")
    assert all(h.epsilon is not None and 1.9 < h.epsilon <= 2.0 for h in hospitals)
    assert max(h.epsilon for h in hospitals if h.epsilon) == run.privacy["epsilon"]
    assert all(h.suppressed == private["suppressed"][h.hospital] for h in hospitals)
    assert all(set(h.suppressed or {}) == {"categories", "histogram_bins"} for h in hospitals)


def test_curves_skip_round_zero_and_follow_each_hospital(view: dict) -> None:
    (run,) = runs_from_views([view], "auc")
    assert run.id == view["id"] and run.status == "completed"
    assert [r for r, _ in run.global_metric] == [1, 2, 3]  # two fit rounds, then the final evaluation
    assert sorted(run.hospital_metric) == ["hospital-1", "hospital-2", "hospital-3"]
    assert all(len(curve) == 3 and all(0 <= v <= 1 for _, v in curve) for curve in run.hospital_metric.values())
    # Local training happens in the fit rounds only; every hospital counted in every round, round 0 included.
    assert {h: [r for r, _ in curve] for h, curve in run.hospital_loss.items()} == dict.fromkeys(HOSPITALS, [1, 2])
    assert all(loss > 0 for curve in run.hospital_loss.values() for _, loss in curve)
    assert run.participation == [(r, HOSPITALS) for r in range(4)] and run.enrolled == HOSPITALS


def test_hospitals_show_their_rows_and_last_round(view: dict) -> None:
    hospitals = hospitals_from_view(view, "auc")
    assert [h.hospital for h in hospitals] == ["hospital-1", "hospital-2", "hospital-3"]
    for hospital in hospitals:
        assert hospital.status == "idle (run completed)" and hospital.epsilon is None  # trained without DP
        assert 700 < hospital.rows < 900 and hospital.rows_quarantined == 0  # its training rows, counted in round 0
        assert hospital.last_round == 3 and 0 <= hospital.metric <= 1
    running = {**view, "status": "running", "open_tasks": [{"hospital": "hospital-2", "status": "leased",
                                                             "holder": "hospital-2-b", "lease_expires": 1000.0}]}
    now = {h.hospital: h for h in hospitals_from_view(running, "auc")}
    assert {h: s.status for h, s in now.items()} == {"hospital-1": "done for this round",
                                                     "hospital-2": "working (hospital-2-b)",
                                                     "hospital-3": "done for this round"}
    # The replicas seen: those whose results counted, and the one holding the open task, renewed lease_s ago.
    counted = {r["nodes"]["hospital-2"] for r in view["history"]}
    assert now["hospital-2"].replicas == sorted(counted | {"hospital-2-b"})
    assert now["hospital-2"].last_heartbeat == 1000.0 - view["config"]["lease_s"]
    assert now["hospital-1"].last_heartbeat is None
    left_out = {**running, "excluded": {"hospital-3": "no valid training rows (0 counted in round 0)"}}
    statuses = {h.hospital: h.status for h in hospitals_from_view(left_out, "auc")}
    assert statuses["hospital-3"] == "left out: no valid training rows (0 counted in round 0)"


def test_a_securely_aggregated_run_is_marked_as_such(view: dict) -> None:
    secure = {**view, "id": "run-secure", "config": {**view["config"], "secure_aggregation": True}}
    assert [r.secure_aggregation for r in runs_from_views([view, secure], "auc")] == [False, True]
