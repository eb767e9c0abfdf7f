import math

import numpy as np
import pytest

from health_mlops.ml.metrics import binary_metrics, regression_metrics


def test_binary_metrics_match_hand_computed_values() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])
    m = binary_metrics(y, p)
    # Pairs (positive, negative): (0.4,0.1) right, (0.4,0.6) wrong, (0.9,0.1) right, (0.9,0.6) right.
    assert m["auc"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert m["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.4) + math.log(0.9)) / 4)


def test_auc_is_nan_with_one_class_and_log_loss_stays_finite() -> None:
    m = binary_metrics(np.array([1, 1]), np.array([0.0, 1.0]))
    assert math.isnan(m["auc"])
    assert math.isfinite(m["log_loss"])


def test_regression_metrics_match_hand_computed_values() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    yhat = np.array([1.0, 2.0, 4.0, 3.0])
    m = regression_metrics(y, yhat)
    assert m["r2"] == pytest.approx(1 - 2 / 5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mae"] == pytest.approx(0.5)
