"""The federated model report, built from what hospitals sent in a run (in memory: the coordinator and hospitals
of the services, no HTTP)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from health_mlops.data.io import read_table
from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.data.validate import validate_table
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.report import ROC_POINTS, model_report
from health_mlops.fl.run_config import RunConfig
from health_mlops.spec import MissingPolicy, load_spec

BASE = load_spec("health-risk")
SPEC = BASE.model_copy(update={"features": tuple(
    f.model_copy(update={"missing": MissingPolicy(codes=("0",), indicator=True)}) if f.name == "spo2" else f
    for f in BASE.features)})


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(2)
    splits = []
    for i, city in enumerate(CITIES[:3], start=1):
        frame = generate_city_days(city, 1500, rng).drop(columns="_risk")
        if i == 2:
            frame.loc[::4, "spo2"] = 0  # not measured
        frame.to_csv(folder / f"{i}.csv", index=False)
        rows = validate_table(read_table(folder / f"{i}.csv"), SPEC).frame
        splits.append(HospitalSplit(f"hospital-{i}", rows.iloc[:1200], rows.iloc[1200:]))
    _, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=4, local_epochs=5, min_hospitals=3))
    return model_report(run, SPEC)


def test_the_report_holds_each_hospitals_metrics_their_mean_and_all_test_rows(report: dict) -> None:
    hospitals = ["hospital-1", "hospital-2", "hospital-3"]
    assert list(report["per_hospital"]) == hospitals and report["test_rows"] == dict.fromkeys(hospitals, 300)
    aucs = [report["per_hospital"][h]["auc"] for h in hospitals]
    assert report["mean_over_hospitals"]["auc"] == pytest.approx(np.mean(aucs))
    for metrics in report["per_hospital"].values():
        assert metrics["auc_ci_low"] <= metrics["auc"] <= metrics["auc_ci_high"]
        assert {"brier", "calibration_slope", "sensitivity", "specificity", "ppv", "npv"} <= set(metrics)
    pooled = report["all_test_rows"]
    assert 0 < pooled["auc_error_bound"] < 0.01 and 0 < pooled["brier"] < 0.25
    assert sum(row["rows"] for row in pooled["reliability"]) == 900


def test_the_report_has_curves_history_data_and_is_strict_json(report: dict) -> None:
    roc = report["curves"]["hospital-1"]["roc"]
    assert len(roc["fpr"]) <= ROC_POINTS and (roc["fpr"][0], roc["tpr"][0]) == (0, 0)
    assert (roc["fpr"][-1], roc["tpr"][-1]) == (1, 1) and roc["fpr"] == sorted(roc["fpr"])
    assert [r["round"] for r in report["history"]] == [1, 2, 3, 4, 5]
    assert report["history"][0]["hospitals"]["hospital-1"]["train_loss"] > 0
    assert report["data"]["hospital-2"]["missing_values"] == {"spo2": 300}  # 1 in 4 of its 1200 training rows
    assert report["data"]["hospital-1"] == {"rows": 1200, "rows_quarantined": 0, "missing_values": {"spo2": 0},
                                            "events": report["data"]["hospital-1"]["events"]}
    assert report["missing_indicators"] == ["spo2"] and report["privacy"] is None
    assert json.loads(json.dumps(report, allow_nan=False)) == report
