"""Scoring on the independent cohort: paired differences, the mean over seeds and the claims, against hand-made
predictions whose order is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from health_mlops.experiments.cohort import mean_over_seeds, score_on_cohort
from health_mlops.metrics import weighted_auc


def cohort_of(rows: int, seed: int) -> dict[str, pd.DataFrame]:
    """Two hospitals whose outcome follows `_risk` exactly as the generator draws it."""
    rng = np.random.default_rng(seed)
    cohort = {}
    for hospital in ("hospital-1", "hospital-2"):
        risk = rng.uniform(0.0, 0.3, rows)
        cohort[hospital] = pd.DataFrame({"x": risk, "_risk": risk,
                                         "event": (rng.random(rows) < risk).astype(int).astype(str)})
    return cohort


def predictions(cohort: dict[str, pd.DataFrame], noise: float, seed: int) -> np.ndarray:
    """The true risk blurred by `noise`: the more noise, the lower the AUC."""
    risk = np.concatenate([frame["_risk"].to_numpy() for frame in cohort.values()])
    return risk + np.random.default_rng(seed).normal(0, noise, len(risk))


def test_scores_pair_the_models_on_the_same_patients_and_the_claims_read_the_intervals() -> None:
    cohort = cohort_of(4000, seed=1)
    sizes = {"hospital-1": 5000, "hospital-2": 300}
    federated, pooled = predictions(cohort, 0.02, seed=2), predictions(cohort, 0.02, seed=3)
    weak = predictions(cohort, 0.3, seed=4)
    scores = score_on_cohort(cohort, sizes, "event", federated=federated, pooled=pooled, local=[federated, weak])
    y = cohort["hospital-2"]["event"].astype(int).to_numpy()
    assert scores.auc["local-only"]["hospital-2"] == pytest.approx(
        float(weighted_auc(y, weak[4000:], np.ones((1, 4000)))[0]))
    change, low, high = scores.difference("federated", "local-only", "hospital-2")
    assert change > 0.05 and 0 < low < change < high
    assert scores.difference("federated", "local-only", "hospital-1") == (0.0, 0.0, 0.0)  # the same predictions
    # Paired: the interval of a difference is far narrower than either model's own.
    own = scores.interval("federated", "hospital-1")
    _, low, high = scores.difference("federated", "pooled", "hospital-1")
    assert high - low < (own[1] - own[0]) / 2
    assert scores.claims() == {"cohort_federated_within_0.005_of_pooled": True,
                               "cohort_federated_not_below_local_anywhere": True,
                               "cohort_federated_above_local_at_small_hospitals": True,
                               "cohort_no_model_above_bayes": True}

    reversed_ = score_on_cohort(cohort, sizes, "event", federated=weak, pooled=pooled, local=[federated, federated])
    assert reversed_.claims() == {"cohort_federated_within_0.005_of_pooled": False,
                                  "cohort_federated_not_below_local_anywhere": False,
                                  "cohort_federated_above_local_at_small_hospitals": False,
                                  "cohort_no_model_above_bayes": True}
    document = scores.to_json()
    assert document["federated"]["per_hospital"]["hospital-2"]["auc_ci"] == list(scores.interval("federated",
                                                                                                 "hospital-2"))
    assert document["differences"]["federated - local-only"]["hospital-2"] == dict(zip(
        ("auc", "low", "high"), scores.difference("federated", "local-only", "hospital-2"), strict=True))
    assert document["claims"] == scores.claims() and document["rows_per_hospital"] == sizes


def test_the_mean_over_seeds_averages_aucs_and_resamples_replicate_by_replicate() -> None:
    sizes = {"hospital-1": 5000, "hospital-2": 300}
    seeds = []
    for seed in (1, 2):
        cohort = cohort_of(2000, seed=seed)
        federated = predictions(cohort, 0.02, seed=10 + seed)
        seeds.append(score_on_cohort(cohort, sizes, "event", federated=federated, pooled=federated,
                                     local=[federated, predictions(cohort, 0.3, seed=20 + seed)]))
    mean = mean_over_seeds(seeds)
    for hospital in sizes:
        assert mean.auc["federated"][hospital] == pytest.approx(
            np.mean([s.auc["federated"][hospital] for s in seeds]))
        np.testing.assert_allclose(mean.replicates["local-only"][hospital],
                                   (seeds[0].replicates["local-only"][hospital]
                                    + seeds[1].replicates["local-only"][hospital]) / 2)
    # Two seeds' noise averages out: the mean's interval is narrower than one seed's.
    one, both = seeds[0].interval("federated", "hospital-1"), mean.interval("federated", "hospital-1")
    assert both[1] - both[0] < one[1] - one[0]
