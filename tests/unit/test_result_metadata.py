"""A hospital's result metadata is checked before anything is stored: the coordinator keeps working."""

from __future__ import annotations

import numpy as np
import pytest

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.coordinator import Coordinator, Rejected
from health_mlops.fl.state import RunStatus, TaskKind, TaskResult
from health_mlops.fl.metadata import check_metadata
from health_mlops.fl.run_config import RunConfig

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]
INITIAL = {"w": np.zeros(3), "b": np.zeros(1)}
STATS = {"count": 10, "sums": [1.0, 2.0], "sums_of_squares": [1.0, 4.0], "target_sum": 1.0,
         "target_sum_of_squares": 1.0}
FIT = {"num_examples": 10, "num_test_examples": 3, "metrics": {"auc": 0.7, "brier": None}}


@pytest.mark.parametrize(("kind", "metadata", "field"), [
    ("stats", {**STATS, "count": "x"}, "count"),
    ("stats", {**STATS, "count": True}, "count"),
    ("stats", {**STATS, "sums": [1.0]}, "sums"),
    ("stats", {**STATS, "target_sum": float("inf")}, "target_sum"),
    ("stats", {k: v for k, v in STATS.items() if k != "sums"}, "sums"),
    ("stats", {**STATS, "histograms": {"age": [1, 2, 3]}}, "histograms.age"),
    ("stats", {**STATS, "histograms": {"age": [-1] * 100}}, "histograms.age.0"),
    ("stats", {**STATS, "rows_quarantined": -3}, "rows_quarantined"),
    ("fit", {**FIT, "num_examples": 10**400}, "num_examples"),
    ("fit", {**FIT, "num_examples": 0}, "num_examples"),
    ("fit", {**FIT, "metrics": "oops"}, "metrics"),
    ("fit", {**FIT, "metrics": {"auc": "high"}}, "metrics"),
    ("fit", {**FIT, "metrics": {"my_made_up_metric": 1.0}}, "metrics"),
    ("fit", {**FIT, "extra": 1}, "extra"),
    ("evaluate", {"num_test_examples": 3, "metrics": {}}, "num_examples"),
])
def test_malformed_metadata_is_refused_naming_the_field(kind: str, metadata: dict, field: str) -> None:
    with pytest.raises(Rejected, match=field) as refusal:
        check_metadata(kind, metadata, columns=2)
    assert refusal.value.reason == "bad_metadata"


def _coordinator() -> Coordinator:
    coordinator = Coordinator(lambda results: GlobalPreprocessing(count=sum(r.count for r in results), mean=[0.0] * 2,
                                                                  scale=[1.0] * 2), stats_columns=2)
    coordinator.start_run("run-1", RunConfig(rounds=1, min_hospitals=2, round_deadline_s=60, lease_s=10),
                          HOSPITALS, INITIAL, now=0.0)
    return coordinator


def test_a_bad_stats_result_is_refused_and_the_round_closes_without_it() -> None:
    coordinator = _coordinator()
    run = coordinator.runs["run-1"]
    bad = coordinator.next_task("hospital-1", "a", 0.0)
    assert bad is not None
    with pytest.raises(Rejected):
        coordinator.submit(bad.id, "hospital-1", "a", TaskResult({**STATS, "count": "x"}), 0.0)
    for hospital in HOSPITALS[1:]:
        task = coordinator.next_task(hospital, "a", 0.0)
        assert task is not None
        coordinator.submit(task.id, hospital, "a", TaskResult(STATS), 0.0)
    assert run.round == 1 and run.preprocessing.count == 20 and run.rejected == {"bad_metadata": 1}


def test_a_hospital_cannot_claim_more_examples_than_it_counted_nor_send_odd_dtypes() -> None:
    coordinator = _coordinator()
    run = coordinator.runs["run-1"]
    for hospital in HOSPITALS:
        task = coordinator.next_task(hospital, "a", 0.0)
        assert task is not None
        coordinator.submit(task.id, hospital, "a", TaskResult(STATS), 0.0)
    assert run.kind_of(run.round) is TaskKind.fit
    update = {"w": np.ones(3), "b": np.ones(1)}
    attempts = {"hospital-1": (TaskResult({**FIT, "num_examples": 11}, update), "bad_metadata"),
                "hospital-2": (TaskResult(FIT, {"w": np.ones(3, dtype=np.int64), "b": np.ones(1)}), "wrong_dtype")}
    for hospital, (result, reason) in attempts.items():
        task = coordinator.next_task(hospital, "a", 1.0)
        assert task is not None
        with pytest.raises(Rejected) as refusal:
            coordinator.submit(task.id, hospital, "a", result, 1.0)
        assert refusal.value.reason == reason
    task = coordinator.next_task("hospital-3", "a", 1.0)
    assert task is not None
    coordinator.submit(task.id, "hospital-3", "a", TaskResult(FIT, update), 1.0)
    assert run.status is RunStatus.running and run.round == 1 and run.attempt == 1  # one valid result < quorum
