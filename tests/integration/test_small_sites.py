"""Sites of 150 patient-days (120 training rows, 30 test rows with 0 to 3 events) train with the defaults: every
way of training converges to a model that ranks and is calibrated, none flags every patient or no one (the former
defaults' few steps left every local-only and federated model there: Brier 0.14 to 0.20, worse than the event
rate's), and the federation stays within 0.02 of pooled training on the mean AUC, over seeds 1 to 5."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from health_mlops.config import get_training_defaults
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.baselines import run_local, run_pooled
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.run_config import federated_run_config
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")
SEEDS = (1, 2, 3, 4, 5)


def trained_on_small_sites(seed: int) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as folder:
        generate_dataset(Path(folder), n_hospitals=5, rows_per_hospital=150, seed=seed, split_seed=seed,
                         test_fraction=0.2)
        splits = split_hospitals(load_hospitals(Path(folder), SPEC), SPEC, seed=seed, test_fraction=0.2)
    local = TrainConfig.for_task(get_training_defaults(), SPEC, seed=seed)
    federated = federated_run_config(SPEC, len(splits), seed=seed)
    event_rate = float(np.concatenate([s.test[SPEC.target.name].astype(int).to_numpy() for s in splits]).mean())
    results = {"pooled": run_pooled(SPEC, splits, local).to_json(), "local": run_local(SPEC, splits, local).to_json(),
               "federated": run_federated_in_memory(SPEC, splits, federated, seed=seed)[0].to_json()}
    return {**results, "event_rate_brier": {"brier": event_rate * (1 - event_rate)}}


@pytest.fixture(scope="module")
def over_seeds() -> list[dict[str, dict]]:
    return [trained_on_small_sites(seed) for seed in SEEDS]


@pytest.mark.xdist_group("small-sites")
def test_no_model_flags_every_patient_or_none_and_each_beats_the_event_rate(over_seeds: list[dict[str, dict]]
                                                                            ) -> None:
    """At a hospital whose test rows hold both outcomes, no model flags them all, nor none of them (2 did, with
    steps, sleep and humidity free of the directions the generator follows); and each way of training
    scores a lower Brier than the test rows' event rate would, on average over the seeds (on one seed, 30 test
    rows with one event each rank no better than chance: seed 5's models score AUC 0.33 to 0.53 there)."""
    for seed, results in zip(SEEDS, over_seeds, strict=True):
        for mode in ("pooled", "local", "federated"):
            one_class = [h for h, m in results[mode]["per_hospital"].items()
                         if m["auc"] is not None and {m["sensitivity"], m["specificity"]} == {0.0, 1.0}]
            assert not one_class, (seed, mode, one_class)
    constant = np.mean([r["event_rate_brier"]["brier"] for r in over_seeds])
    for mode in ("pooled", "local", "federated"):
        brier = np.mean([r[mode]["overall"]["brier"] for r in over_seeds])
        assert brier < constant, (mode, brier, constant)


@pytest.mark.xdist_group("small-sites")
def test_the_federation_is_within_0_02_of_pooled_training_on_small_sites(over_seeds: list[dict[str, dict]]) -> None:
    def mean_auc(mode: str) -> float:
        return float(np.mean([r[mode]["mean_over_hospitals"]["auc"] for r in over_seeds]))

    assert mean_auc("federated") >= mean_auc("pooled") - 0.02, (mean_auc("federated"), mean_auc("pooled"))
