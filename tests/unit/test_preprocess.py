import numpy as np
import pandas as pd
import pytest

from health_mlops.data.preprocess import Preprocessor, encode_features, encoded_columns, stats_of_frame
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


def frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(3)
    return [generate_city_days(city, 200, rng).drop(columns="_risk") for city in CITIES[:3]]


def test_standardisation_from_sums_gives_zero_mean_unit_variance() -> None:
    pooled = pd.concat(frames(), ignore_index=True)
    x = Preprocessor.from_stats(SPEC, stats_of_frame(pooled, SPEC)).features(pooled)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-4)


def test_categories_come_from_the_spec_not_the_data() -> None:
    only_never_smokers = frames()[0].assign(smoker="never")
    columns = encoded_columns(SPEC)
    assert [c for c in columns if c.startswith("smoker=")] == ["smoker=never", "smoker=former", "smoker=current"]
    encoded = encode_features(only_never_smokers, SPEC)
    assert encoded.shape[1] == len(columns)
    current = encoded[:, columns.index("smoker=current")]
    assert (current == 0).all()
    # A category no row has cannot be scaled; it is left at scale 1, not divided by zero.
    x = Preprocessor.from_stats(SPEC, stats_of_frame(only_never_smokers, SPEC)).features(only_never_smokers)
    assert np.isfinite(x).all()


def test_regression_target_is_standardised_and_restored() -> None:
    spec = load_spec("diabetes")
    frame = pd.DataFrame({f: [1.0, 2.0, 3.0] for f in spec.feature_names} | {"sex": ["1", "2", "1"],
                                                                            "progression": [100.0, 200.0, 300.0]})
    pre = Preprocessor.from_stats(spec, stats_of_frame(frame, spec))
    y = pre.target(frame)
    assert y.mean() == pytest.approx(0, abs=1e-6)
    np.testing.assert_allclose(pre.restore_target(y.astype(np.float64)), [100, 200, 300], rtol=1e-6)
