import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from health_mlops.metrics import (BINARY_METRICS, CALIBRATION_BINS, BinarySummary, binary_metrics, bootstrap_auc,
                                     combine, mean_over_hospitals, regression_metrics, share_below,
                                     undefined_reasons, weighted_auc)


def test_binary_metrics_match_hand_computed_values() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])
    m = binary_metrics(y, p, threshold=0.5, bootstrap=0)
    # Pairs (positive, negative): (0.4,0.1) right, (0.4,0.6) wrong, (0.9,0.1) right, (0.9,0.6) right.
    assert m["auc"] == pytest.approx(0.75)
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert m["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.4) + math.log(0.9)) / 4)
    # At 0.5: flagged 0.6 (no event) and 0.9 (event); missed 0.4 (event); cleared 0.1.
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["accuracy"] == m["balanced_accuracy"] == 0.5
    at_035 = binary_metrics(y, p, threshold=0.35, bootstrap=0)  # flags 0.4, 0.6, 0.9
    assert (at_035["sensitivity"], at_035["specificity"], at_035["ppv"], at_035["npv"]) == (1.0, 0.5, 2 / 3, 1.0)
    assert "auc_ci_low" not in m  # no bootstrap asked for


def test_one_class_leaves_the_auc_and_calibration_undefined_with_the_reason() -> None:
    y, p = np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9])
    m = binary_metrics(y, p, threshold=0.5)
    for name in ("auc", "auc_ci_low", "calibration_slope", "calibration_intercept", "specificity",
                 "balanced_accuracy"):
        assert math.isnan(m[name]), name
    assert m["sensitivity"] == pytest.approx(2 / 3) and math.isfinite(m["log_loss"])
    reasons = undefined_reasons(y, p, 0.5, "event")
    assert reasons["auc"] == "its 3 test rows all have event = 1" and "sensitivity" not in reasons
    assert set(reasons) == {name for name, value in m.items() if math.isnan(value)}
    assert undefined_reasons(np.array([]), np.array([]), 0.5, "event") == {n: "no test rows" for n in BINARY_METRICS}
    assert "no row has a risk at or above" in undefined_reasons(np.array([0, 1]), np.array([0.1, 0.2]), 0.5,
                                                                "event")["ppv"]


def test_the_auc_of_every_bootstrap_replicate_equals_sklearn_on_the_resampled_rows() -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(300) < 0.2).astype(float)
    p = np.round(np.clip(0.2 + 0.3 * y + rng.normal(0, 0.2, 300), 0.01, 0.99), 2)  # rounded: many ties
    assert weighted_auc(y, p, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    counts = np.random.default_rng(9).multinomial(300, np.full(300, 1 / 300), size=20)  # any weights
    for replicate, auc in zip(counts, weighted_auc(y, p, counts), strict=True):
        rows = np.repeat(np.arange(300), replicate)
        assert auc == pytest.approx(roc_auc_score(y[rows], p[rows]), abs=1e-12)
    aucs = bootstrap_auc(y, p, 1000, seed=0)
    m = binary_metrics(y, p, threshold=0.2)
    assert m["auc_ci_low"] < m["auc"] < m["auc_ci_high"]
    assert m["auc_ci_low"] == pytest.approx(np.percentile(aucs, 2.5)) and m["auc_se"] == pytest.approx(aucs.std(ddof=1))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_calibration_slope_and_intercept_read_calibrated_and_overconfident_risks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logit = rng.normal(-1.5, 1.2, 20_000)
    y = (rng.random(20_000) < 1 / (1 + np.exp(-logit))).astype(float)
    calibrated = binary_metrics(y, 1 / (1 + np.exp(-logit)), threshold=0.2, bootstrap=0)
    assert abs(calibrated["calibration_slope"] - 1) < 0.08 and abs(calibrated["calibration_intercept"]) < 0.06
    overconfident = binary_metrics(y, 1 / (1 + np.exp(-2 * logit)), threshold=0.2, bootstrap=0)
    assert abs(overconfident["calibration_slope"] - 0.5) < 0.04
    too_high = binary_metrics(y, 1 / (1 + np.exp(-(logit + 1))), threshold=0.2, bootstrap=0)
    assert abs(too_high["calibration_intercept"] + 1) < 0.08  # risks one logit too high: intercept about -1


def hospitals(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    found = []
    for rows, shift in ((400, -2.0), (1500, -1.2), (90, -2.5)):
        logit = rng.normal(shift, 1.3, rows)
        y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(float)
        found.append((y, 1 / (1 + np.exp(-(0.8 * logit + rng.normal(0, 0.5, rows))))))
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_from_summed_counts_equal_the_pooled_rows_and_the_auc_is_within_its_bound(seed: int) -> None:
    parts = hospitals(seed)
    y = np.concatenate([y for y, _ in parts])
    p = np.concatenate([p for _, p in parts])
    combined = combine(BinarySummary.of(y, p, 0.15) for y, p in parts)
    pooled = BinarySummary.of(y, p, 0.15)
    assert combined.confusion == pooled.confusion and combined.rows == len(y)  # counts exactly
    assert combined.calibration_count == pooled.calibration_count
    assert combined.calibration_observed == pooled.calibration_observed
    np.testing.assert_allclose(combined.calibration_predicted, pooled.calibration_predicted, rtol=1e-12)
    exact = binary_metrics(y, p, 0.15, bootstrap=0)
    from_counts = combined.metrics()
    for name in ("brier", "log_loss", "accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy"):
        assert from_counts[name] == pytest.approx(exact[name], rel=1e-9, abs=1e-12), name
    for k, row in enumerate(combined.reliability()):  # the reliability bins as the pooled rows give them
        in_bin = (np.minimum((p * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1) == round(row["low"] * 10))
        assert row["rows"] == in_bin.sum() and row["observed"] == pytest.approx(y[in_bin].mean(), rel=1e-12), k
    auc, bound = from_counts["auc"], from_counts["auc_error_bound"]
    assert abs(auc - exact["auc"]) <= bound < 0.005


def test_the_mean_over_hospitals_counts_each_hospital_once_where_defined() -> None:
    per_hospital = {"a": {"auc": 0.8, "auc_se": 0.03, "brier": 0.1}, "b": {"auc": 0.6, "auc_se": 0.04, "brier": 0.3},
                    "c": {"auc": None, "auc_se": None, "brier": 0.2}}
    mean = mean_over_hospitals(per_hospital)
    assert mean["auc"] == pytest.approx(0.7) and mean["brier"] == pytest.approx(0.2)
    assert mean["auc_se"] == pytest.approx(0.05 / 2)
    assert (mean["auc_ci_low"], mean["auc_ci_high"]) == (pytest.approx(0.7 - 0.049), pytest.approx(0.7 + 0.049))
    assert mean_over_hospitals({"a": {"auc": None}})["auc"] is None
    without_interval = mean_over_hospitals({**per_hospital, "c": {"auc": 0.9, "auc_se": None}})
    assert without_interval["auc"] == pytest.approx(0.7667, abs=1e-4) and without_interval["auc_ci_low"] is None


def test_a_summary_survives_json_and_refuses_another_threshold() -> None:
    y, p = hospitals()[0]
    summary = BinarySummary.of(y, p, 0.2)
    assert BinarySummary.from_json(summary.to_json()) == summary
    with pytest.raises(ValueError, match="thresholds"):
        summary + BinarySummary.of(y, p, 0.3)


def test_regression_metrics_match_hand_computed_values() -> None:
    y = np.array([1.0, 2.0, 3.0, 4.0])
    yhat = np.array([1.0, 2.0, 4.0, 3.0])
    m = regression_metrics(y, yhat)
    assert m["r2"] == pytest.approx(1 - 2 / 5)
    assert m["rmse"] == pytest.approx(math.sqrt(0.5))
    assert m["mae"] == pytest.approx(0.5)


def test_a_calibration_slope_from_a_handful_of_events_is_null_with_its_reason() -> None:
    """A slope of -124 ± 277 from 5 test rows was printed as a number; it says nothing."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.6, 5)
    y = np.array([0, 1, 0, 0, 1])
    few = binary_metrics(y, p, threshold=0.3, bootstrap=0)
    assert math.isnan(few["calibration_slope"]) and math.isfinite(few["calibration_intercept"])
    reasons = undefined_reasons(y, p, 0.3, "event")
    assert reasons["calibration_slope"] == ("its 5 test rows hold 2 with event = 1 and 3 with 0: a slope needs 10 "
                                            "of each")
    p = rng.uniform(0.05, 0.6, 200)
    enough = binary_metrics((rng.random(200) < p).astype(float), p, threshold=0.3, bootstrap=0)
    assert math.isfinite(enough["calibration_slope"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_risks_percentile_and_its_deciles_from_the_counts_match_the_rows_themselves(seed: int) -> None:
    """What the Predict tab says of a risk, from counts only: the share of test patients predicted lower (within a
    score bin's rows of the exact share) and the deciles of predicted risk with their calibration."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-3.5, 1.2, 5000)))  # a 3 % event rate: nearly every risk under 10 %
    y = (rng.random(5000) < p).astype(int)
    halves = BinarySummary.of(y[:2500], p[:2500], 0.03) + BinarySummary.of(y[2500:], p[2500:], 0.03)
    counts = halves.risk_counts()
    for risk in (0.001, 0.01, 0.03, 0.2, 0.9):
        largest_bin = max(counts) / len(p)
        assert abs(share_below(counts, risk) - float(np.mean(p < risk))) <= largest_bin
    assert share_below(counts, 0.0) == 0.0 and share_below(counts, 1.0) == 1.0
    bands = halves.risk_bands()
    assert len(bands) == 10 and sum(b["rows"] for b in bands) == 5000
    assert all(350 <= b["rows"] <= 650 for b in bands)  # tenths, up to the bins they do not split
    for band in bands:
        inside = (p >= band["low"]) & (p < band["high"])
        assert band["rows"] == inside.sum()
        assert band["observed"] == pytest.approx(y[inside].mean())
        assert band["predicted"] == pytest.approx(p[inside].mean(), rel=0.03)  # at the bins' centres
    assert bands[0]["low"] <= p.min() and bands[-1]["high"] > p.max() and bands[4]["high"] < 0.1
