"""A federated run with differential privacy, in memory (the same coordinator and hospital code as the services):
each hospital trains with DP-SGD, what it spends is accounted from the steps it reports, and a budget that cannot
be met ends the run after round 0, before any hospital trains."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import HospitalSplit, split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.coordinator import Coordinator
from health_mlops.fl.privacy_budget import privacy_report, privacy_spent
from health_mlops.fl.state import RunStatus, TaskKind
from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.stats import reduce_stats
from health_mlops.fl.publish import training_record
from health_mlops.fl.run_config import PrivacyConfig, RunConfig, StrategyConfig
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> list[HospitalSplit]:
    root = tmp_path_factory.mktemp("dp") / "data"
    generate_dataset(root, n_hospitals=3, rows_per_hospital=800, seed=4, split_seed=42, test_fraction=0.2)
    return split_hospitals(load_hospitals(root, SPEC), SPEC, seed=42, test_fraction=0.2)


def test_each_hospital_spends_at_most_its_budget_over_the_run(splits: list[HospitalSplit]) -> None:
    config = RunConfig(rounds=3, local_epochs=1, batch_size=32, min_hospitals=3,
                       privacy=PrivacyConfig(epsilon=2.0, delta=1e-5))
    _, run = run_federated_in_memory(SPEC, splits, config)
    assert run.status is RunStatus.completed
    fits = [r for r in run.history if r.kind is TaskKind.fit]
    assert all(m.dp_steps == 20 for r in fits for m in r.hospitals.values())  # 640 rows / 32 a batch
    spent = privacy_spent(run)
    assert sorted(spent) == sorted(s.hospital_id for s in splits)
    assert all(1.9 <= eps <= 2.0 + 0.01 for eps in spent.values()), spent  # the whole budget, no more
    assert all(np.isfinite(w).all() for w in run.weights.values())
    report = privacy_report(run)
    assert report is not None and report["epsilon"] == max(spent.values()) and report["delta"] == 1e-5
    assert {h: p["epsilon"] for h, p in report["hospitals"].items()} == spent
    assert all(p["noise_multiplier"] > 0.5 for p in report["hospitals"].values())
    record = training_record(run, SPEC, run.weights)  # what the registry gets: the run's ε and δ with the model
    assert record.privacy == {"epsilon": max(spent.values()), "delta": 1e-5}
    assert record.hospital_epsilons == spent


def test_a_run_without_a_budget_reports_no_privacy(splits: list[HospitalSplit]) -> None:
    _, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=1, min_hospitals=3))
    assert privacy_report(run) is None and privacy_spent(run) == {}
    assert training_record(run, SPEC, run.weights).privacy is None


def test_a_budget_that_cannot_be_met_ends_the_run_before_any_hospital_trains(splits: list[HospitalSplit]) -> None:
    config = RunConfig(rounds=3, min_hospitals=3, batch_size=32, privacy=PrivacyConfig(epsilon=0.05))
    coordinator = Coordinator(partial(reduce_stats, SPEC))
    workers = {s.hospital_id: HospitalWorker(s.hospital_id, SPEC, s.train, s.test) for s in splits}
    run = coordinator.start_run("dp", config, list(workers), initial_weights(SPEC, 0), now=0.0)
    for hospital, worker in workers.items():
        task = coordinator.next_task(hospital, "node", 0.0)
        assert task is not None and task.kind is TaskKind.stats
        coordinator.submit(task.id, hospital, "node", worker.handle(task.kind, config, {}, {}, 0), 0.0)
    assert run.status is RunStatus.failed and run.reason.startswith("privacy budget refused at 3 of 3 hospitals")
    assert all(f"at {hospital}: " in run.reason for hospital in workers)  # every site's reason in one message
    assert "cannot be met" in run.reason or "noise multiplier" in run.reason
    assert all(coordinator.next_task(h, "node", 1.0) is None for h in workers)  # nobody gets a fit task


def test_privacy_with_fedprox_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="privacy"):
        RunConfig(strategy=StrategyConfig(name="fedprox", proximal_mu=0.1), privacy=PrivacyConfig(epsilon=3))
