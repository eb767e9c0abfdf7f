"""Issue 13's acceptance for differential privacy, on the acceptance data (5 hospitals x 4000 patient-days) over
three generator seeds: the run `train --mode federated --dp-epsilon 3` starts spends ε ≤ 3 at δ = 1e-5 at every
hospital over the whole run, and its model's overall AUC is within 0.05 of the same run without privacy.

The in-memory core (the coordinator and hospitals' code the services run, no HTTP) trains both runs, with the
configuration the CLI builds: DP-SGD's own defaults included. DP noise is not seeded (it must not be predictable),
so each run differs a little; `benchmarks/privacy.py` measured a worst loss of 0.02 AUC at ε = 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from health_mlops.config import get_settings
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.privacy_budget import privacy_report
from health_mlops.fl.run_config import PrivacyConfig, federated_run_config
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_dp_at_epsilon_3_costs_under_005_auc(seed: int, tmp_path: Path) -> None:
    settings = get_settings()
    generate_dataset(tmp_path, n_hospitals=5, rows_per_hospital=4000, seed=seed, split_seed=settings.split_seed,
                     test_fraction=settings.test_fraction)
    splits = split_hospitals(load_hospitals(tmp_path, SPEC), SPEC, seed=settings.split_seed,
                             test_fraction=settings.test_fraction)
    plain, _ = run_federated_in_memory(SPEC, splits, federated_run_config(SPEC, 5))
    config = federated_run_config(SPEC, 5, privacy=PrivacyConfig(epsilon=3.0, delta=1e-5))
    private, run = run_federated_in_memory(SPEC, splits, config)
    report = privacy_report(run)
    assert report is not None and report["delta"] == 1e-5
    assert sorted(report["hospitals"]) == [f"hospital-{i}" for i in range(1, 6)]
    assert all(2.9 < h["epsilon"] <= 3.0 for h in report["hospitals"].values()), report  # spent, never more
    assert private.overall["auc"] > plain.overall["auc"] - 0.05, (private.overall, plain.overall)
