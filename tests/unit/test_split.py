import numpy as np

from health_mlops.data.split import split_indices


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
