import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from health_mlops.data.synthetic import (CITIES, generate_city_days, generate_cohort, generate_dataset, generator_of,
                                        true_risk)
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


def generate(out: Path, seed: int, rows: int = 600) -> list:
    return generate_dataset(out, n_hospitals=5, rows_per_hospital=rows, seed=seed, split_seed=42, test_fraction=0.2)


def test_same_seed_writes_the_same_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=1)
    generate(tmp_path / "b", seed=1)
    generate(tmp_path / "c", seed=2)
    a = (tmp_path / "a" / "hospital-3" / "patient_days.csv").read_bytes()
    assert a == (tmp_path / "b" / "hospital-3" / "patient_days.csv").read_bytes()
    assert a != (tmp_path / "c" / "hospital-3" / "patient_days.csv").read_bytes()


def test_hospitals_differ_in_event_rate_and_feature_means(tmp_path: Path) -> None:
    summaries = generate(tmp_path, seed=7, rows=3000)
    rates = [s.event_rate for s in summaries]
    assert max(rates) > 2 * min(rates)
    assert max(s.mean_pm25 for s in summaries) - min(s.mean_pm25 for s in summaries) > 5
    assert max(s.mean_temperature for s in summaries) - min(s.mean_temperature for s in summaries) > 10
    assert max(s.mean_age for s in summaries) - min(s.mean_age for s in summaries) > 5
    assert [s.city for s in summaries] == [c.name for c in CITIES]


def test_generated_rows_are_valid_under_the_spec() -> None:
    frame = generate_city_days(CITIES[1], 5000, np.random.default_rng(0)).drop(columns="_risk")
    assert list(frame.columns) == SPEC.required_columns
    for feature in SPEC.features:
        if feature.type == "numeric":
            assert frame[feature.name].between(feature.min, feature.max).all(), feature.name
        else:
            assert set(frame[feature.name]) <= set(feature.categories), feature.name


def test_true_risk_is_calibrated_and_reads_only_recorded_columns() -> None:
    frame = generate_city_days(CITIES[1], 40000, np.random.default_rng(1))
    recorded_only = frame[SPEC.feature_names]
    risk = true_risk(recorded_only)
    np.testing.assert_array_equal(risk, frame["_risk"].to_numpy())
    events = frame["adverse_event_7d"].astype(int)
    assert abs(events.mean() - risk.mean()) < 0.01
    # Calibration by decile of risk: the observed rate follows the true risk.
    deciles = pd.qcut(risk, 10, labels=False)
    observed = events.groupby(deciles).mean().to_numpy()
    expected = pd.Series(risk).groupby(deciles).mean().to_numpy()
    assert np.abs(observed - expected).max() < 0.05


def test_exposure_times_vulnerability_raises_risk() -> None:
    frame = generate_city_days(CITIES[0], 2000, np.random.default_rng(2))
    clean_air = frame.assign(pm25=5.0, no2=10.0, asthma_copd="1")
    polluted = frame.assign(pm25=80.0, no2=80.0, asthma_copd="1")
    polluted_healthy = frame.assign(pm25=80.0, no2=80.0, asthma_copd="0")
    assert (true_risk(polluted) > true_risk(clean_air)).all()
    # Pollution hurts the asthmatic more than the healthy.
    gain_asthma = true_risk(polluted).mean() - true_risk(clean_air).mean()
    gain_healthy = true_risk(polluted_healthy).mean() - true_risk(frame.assign(pm25=5.0, no2=10.0,
                                                                               asthma_copd="0")).mean()
    assert gain_asthma > 2 * gain_healthy


def test_reference_scores_the_true_risk_on_the_models_test_split(tmp_path: Path) -> None:
    generate(tmp_path, seed=3)
    reference = json.loads((tmp_path / "reference.json").read_text())
    assert reference["split"] == {"seed": 42, "test_fraction": 0.2, "stratified": True}
    assert set(reference["per_hospital"]) == {f"hospital-{i}" for i in range(1, 6)}
    assert 0.5 < reference["overall"]["auc"] <= 1.0
    assert (tmp_path / "spec.yaml").is_file()


def test_hospitals_of_unequal_size_and_a_cohort_that_leaves_the_training_rows_as_they_were(tmp_path: Path) -> None:
    sizes = [1200, 600, 250, 80, 30]
    summaries = generate_dataset(tmp_path / "a", n_hospitals=5, rows_per_hospital=sizes, seed=3, split_seed=42,
                                 test_fraction=0.2)
    assert [s.rows for s in summaries] == sizes
    assert generator_of(tmp_path / "a") == (3, sizes)
    # The cohort comes from a stream of its own: drawing it changes no training row of the same seed.
    cohort = generate_cohort(n_hospitals=5, seed=3, rows=500)
    generate_dataset(tmp_path / "b", n_hospitals=5, rows_per_hospital=sizes, seed=3, split_seed=42, test_fraction=0.2)
    for hospital in ("hospital-1", "hospital-5"):
        assert ((tmp_path / "a" / hospital / "patient_days.csv").read_bytes()
                == (tmp_path / "b" / hospital / "patient_days.csv").read_bytes())
    assert list(cohort) == [f"hospital-{i}" for i in range(1, 6)] and all(len(c) == 500 for c in cohort.values())
    training = pd.read_csv(tmp_path / "a" / "hospital-1" / "patient_days.csv")
    assert not training["heart_rate"].head(50).equals(cohort["hospital-1"]["heart_rate"].head(50))
    np.testing.assert_allclose(cohort["hospital-2"]["_risk"], true_risk(cohort["hospital-2"]))  # the true risk
    assert all(cohort[h].equals(c) for h, c in generate_cohort(n_hospitals=5, seed=3, rows=500).items())
    with pytest.raises(ValueError, match="3 hospital sizes for 5 hospitals"):
        generate_dataset(tmp_path / "c", n_hospitals=5, rows_per_hospital=[10, 20, 30], seed=3, split_seed=42,
                         test_fraction=0.2)
