import numpy as np
import pandas as pd
import pytest

from health_mlops.data.split import hold_out_validation, split_frame, split_indices, target_strata
from health_mlops.spec import load_spec


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, test = split_indices(1000, "hospital-1", seed=42, test_fraction=0.2)
    again_train, again_test = split_indices(1000, "hospital-1", seed=42, test_fraction=0.2)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert len(test) == 200
    assert not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(1000))


def test_split_differs_by_hospital_and_seed() -> None:
    _, test_1 = split_indices(1000, "hospital-1", seed=42, test_fraction=0.2)
    _, test_2 = split_indices(1000, "hospital-2", seed=42, test_fraction=0.2)
    _, test_seed = split_indices(1000, "hospital-1", seed=43, test_fraction=0.2)
    assert not np.array_equal(test_1, test_2)
    assert not np.array_equal(test_1, test_seed)


def test_tiny_hospitals_keep_a_training_row() -> None:
    train, test = split_indices(2, "h", seed=0, test_fraction=0.9)
    assert len(train) == 1 and len(test) == 1
    train, test = split_indices(1, "h", seed=0, test_fraction=0.2)
    assert len(train) == 1 and len(test) == 0


def test_a_stratified_split_keeps_each_outcomes_share_and_both_outcomes_in_a_small_test_split() -> None:
    outcome = np.zeros(1000)
    outcome[::40] = 1  # 25 events in 1000 rows
    train, test = split_indices(1000, "hospital-1", seed=42, test_fraction=0.2, strata=outcome)
    assert len(test) == 200 and outcome[test].sum() == 5 and outcome[train].sum() == 20
    assert sorted(np.concatenate([train, test])) == list(range(1000))
    small = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # 11 rows, 2 events: each side gets one
    train, test = split_indices(11, "hospital-9", seed=42, test_fraction=0.2, strata=small)
    assert small[test].sum() == 1 and small[train].sum() == 1 and len(test) == 3
    again = split_indices(11, "hospital-9", seed=42, test_fraction=0.2, strata=small)
    assert [list(a) for a in again] == [list(train), list(test)]


def test_a_regression_target_is_stratified_by_its_quintiles() -> None:
    spec = load_spec("diabetes")
    frame = pd.DataFrame({spec.target.name: np.arange(100, dtype=float)})
    strata = target_strata(frame, spec)
    assert sorted(np.bincount(strata.astype(int))) == [20] * 5
    train, test = split_frame(frame, spec, "site-1", seed=0, test_fraction=0.2, stratify=True)
    assert sorted(np.bincount(strata[test].astype(int))) == [4] * 5
    unstratified = split_frame(frame, spec, "site-1", seed=0, test_fraction=0.2, stratify=False)
    expected = split_indices(100, "site-1", seed=0, test_fraction=0.2)
    assert [list(a) for a in unstratified] == [list(a) for a in expected]


def test_validation_rows_are_held_out_stratified_and_a_tiny_site_keeps_every_row() -> None:
    spec = load_spec("health-risk")
    target = spec.target.name
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({target: (rng.random(500) < 0.1).astype(int).astype(str), "row": np.arange(500)})
    fit, validation = hold_out_validation(frame, spec, "hospital-1", fraction=0.2)
    again = hold_out_validation(frame, spec, "hospital-1", fraction=0.2)[1]
    assert len(validation) == 100 and set(fit["row"]).isdisjoint(validation["row"])
    assert len(fit) + len(validation) == 500 and validation["row"].tolist() == again["row"].tolist()
    assert validation[target].astype(int).mean() == pytest.approx(frame[target].astype(int).mean(), abs=0.01)
    tiny = frame.head(40)  # 8 validation rows would measure nothing
    fit, validation = hold_out_validation(tiny, spec, "hospital-1", fraction=0.2)
    assert len(fit) == 40 and validation.empty
