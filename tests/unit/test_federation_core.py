"""The hospital side of each task and a whole federation in memory (coordinator + hospitals, no HTTP)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from health_mlops.data.preprocess import Preprocessor, encode_target, encoded_columns, histogram_edges, stats_of_frame
from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.stats import hospital_stats, reduce_stats, suppressed_cells
from health_mlops.fl.run_config import RunConfig
from health_mlops.metrics import BinarySummary, binary_metrics, combine
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.model import model_with_weights
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


def city_frames(rows: int = 400) -> list[pd.DataFrame]:
    rng = np.random.default_rng(5)
    return [generate_city_days(city, rows, rng).drop(columns="_risk") for city in CITIES[:3]]


def test_global_standardisation_from_hospital_stats_equals_pooled_standardisation() -> None:
    frames = city_frames()
    reduced = reduce_stats(SPEC, [hospital_stats(f, SPEC, small_cell_threshold=0) for f in frames])
    pooled = Preprocessor.from_stats(SPEC, stats_of_frame(pd.concat(frames, ignore_index=True), SPEC))
    federated = Preprocessor.of_run(SPEC, reduced)
    np.testing.assert_allclose(federated.mean, pooled.mean, rtol=1e-9)
    np.testing.assert_allclose(federated.scale, pooled.scale, rtol=1e-9)


def test_small_cells_are_suppressed_and_left_out_of_their_column() -> None:
    frames = city_frames()
    frames[0] = frames[0].assign(smoker="never")
    frames[0].loc[:2, "smoker"] = "current"  # 3 current smokers: below a threshold of 5
    stats = hospital_stats(frames[0], SPEC, small_cell_threshold=5)
    column = encoded_columns(SPEC).index("smoker=current")
    assert stats.sums[column] is None and stats.sums_of_squares[column] is None
    assert stats.sums[encoded_columns(SPEC).index("smoker=never")] == len(frames[0]) - 3
    reduced = reduce_stats(SPEC, [stats, *[hospital_stats(f, SPEC, 5) for f in frames[1:]]])
    others = pd.concat(frames[1:])
    assert reduced.mean[column] == (others["smoker"] == "current").mean()


def test_suppressed_cells_are_counted_from_what_is_sent() -> None:
    frame = city_frames()[0].assign(smoker="never", diabetes="0")
    frame.loc[:2, "smoker"] = "current"  # 3 current smokers, 2 former: both categories below 5
    frame.loc[3:4, "smoker"] = "former"
    frame.loc[:3, "diabetes"] = "1"  # 4 with diabetes
    stats = hospital_stats(frame, SPEC, small_cell_threshold=5)
    edges = {f.name: histogram_edges(f) for f in SPEC.features if f.type == "numeric"}
    small_bins = sum(int(((0 < c) & (c < 5)).sum()) for name, e in edges.items()
                     for c in [np.histogram(frame[name], bins=e)[0]])
    assert suppressed_cells(stats) == {"categories": 3, "histogram_bins": small_bins}
    assert small_bins > 0  # the tails of 400 patient-days hold bins of a few patients
    assert suppressed_cells(hospital_stats(frame, SPEC, small_cell_threshold=0)) == {"categories": 0,
                                                                                     "histogram_bins": 0}


def test_histograms_are_summed_over_hospitals_with_small_bins_suppressed() -> None:
    frames = city_frames()
    parts = [hospital_stats(f, SPEC, small_cell_threshold=5) for f in frames]
    edges = histogram_edges(next(f for f in SPEC.features if f.name == "age"))
    counts = [np.histogram(f["age"], bins=edges)[0] for f in frames]
    assert parts[0].histograms["age"] == [None if 0 < c < 5 else c for c in counts[0]]
    summed = reduce_stats(SPEC, parts).histograms["age"]
    assert summed == sum(np.where((0 < c) & (c < 5), 0, c) for c in counts).tolist()
    numeric = sorted(f.name for f in SPEC.features if f.type == "numeric")
    assert sorted(reduce_stats(SPEC, parts).histograms) == numeric


def test_federated_training_in_memory_learns_and_counts_every_round() -> None:
    splits = [HospitalSplit(f"hospital-{i}", frame.iloc[:320], frame.iloc[320:])
              for i, frame in enumerate(city_frames(), start=1)]
    result, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=3, local_epochs=1, min_hospitals=3))
    assert [h.kind.value for h in run.history] == ["stats", "fit", "fit", "fit", "evaluate"]
    assert all(set(h.hospitals) == {"hospital-1", "hospital-2", "hospital-3"} for h in run.history)
    first_fit, final = run.history[1], run.history[-1]
    # Federated evaluation: the trained model beats the untrained one on the hospitals' own test rows.
    before = np.mean([m.metrics["log_loss"] for m in first_fit.hospitals.values()])
    after = np.mean([m.metrics["log_loss"] for m in final.hospitals.values()])
    assert after < before
    assert result.mode == "federated" and 0.5 < result.overall["auc"] <= 1


def test_each_hospitals_metrics_are_computed_at_the_hospital_exactly_as_centrally_and_only_counts_leave() -> None:
    splits = [HospitalSplit(f"hospital-{i}", frame.iloc[:320], frame.iloc[320:])
              for i, frame in enumerate(city_frames(), start=1)]
    result, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=5, local_epochs=10, min_hospitals=3))
    final = run.history[-1]
    assert all(m.metrics["npv"] is not None and m.metrics["auc"] > 0.8 for m in final.hospitals.values())
    threshold = run.preprocessing.threshold
    assert threshold == pytest.approx(np.mean([s.train[SPEC.target.name].astype(float).mean() for s in splits]))
    preprocessor = Preprocessor.of_run(SPEC, run.preprocessing)
    model = model_with_weights(SPEC.model, len(preprocessor.mean), run.weights)
    summaries = []
    for split in splits:
        sent = final.hospitals[split.hospital_id]
        y, p = encode_target(split.test, SPEC), predict_frame(model, preprocessor, split.test)
        central = binary_metrics(y, p, threshold)  # the same rows, scored where they are not
        undefined_as_nan = {k: np.nan if v is None else v for k, v in sent.metrics.items()}  # sent as null
        assert undefined_as_nan == pytest.approx(central, rel=1e-9, abs=1e-12, nan_ok=True), split.hospital_id
        assert sent.model_fields_set <= {"num_examples", "num_test_examples", "metrics", "summary", "compute_seconds",
                                         "validation_loss_sum", "validation_rows", "site_calibration",
                                         "calibrated_metrics", "local_comparison"}
        summaries.append(BinarySummary.from_json(sent.summary.model_dump()))
        assert summaries[-1] == BinarySummary.of(y, p, threshold)
    combined = combine(summaries).metrics()
    pooled_y = np.concatenate([encode_target(s.test, SPEC) for s in splits])
    pooled_p = np.concatenate([predict_frame(model, preprocessor, s.test) for s in splits])
    pooled = binary_metrics(pooled_y, pooled_p, threshold, bootstrap=0)
    for name in ("brier", "log_loss", "accuracy", "sensitivity", "specificity", "ppv", "npv", "balanced_accuracy"):
        assert combined[name] == pytest.approx(pooled[name], rel=1e-9, abs=1e-12, nan_ok=True), name
    assert abs(combined["auc"] - pooled["auc"]) <= combined["auc_error_bound"]
    assert result.mean_over_hospitals["auc"] == pytest.approx(np.mean([final.hospitals[s.hospital_id].metrics["auc"]
                                                                       for s in splits]), rel=1e-9)
