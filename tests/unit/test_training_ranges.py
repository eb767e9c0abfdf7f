"""Honest outside what the model saw: each numeric input is clamped to the range the training rows covered (from
the run's federated histograms), in training, evaluation and the exported graph alike, and serving names every
input beyond it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from health_mlops.data.preprocess import HISTOGRAM_BINS, Preprocessor, histogram_edges, training_ranges
from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import CITIES, generate_city_days, true_risk
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.stats import hospital_stats, reduce_stats
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.ml.model import model_with_weights
from health_mlops.ml.onnx import export_onnx, stored_training_ranges
from health_mlops.serving.model import ServedModel
from health_mlops.spec import DatasetSpec, load_spec, spec_to_yaml
from health_mlops.data.preprocess import serving_matrix

SPEC = load_spec("health-risk")


def frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(4)
    return [generate_city_days(city, 500, rng).drop(columns="_risk") for city in CITIES[:3]]


def test_a_range_runs_from_the_bin_of_the_half_percentile_to_the_bin_of_the_99_5th() -> None:
    spo2 = next(f for f in SPEC.features if f.name == "spo2")
    edges = histogram_edges(spo2)
    assert edges is not None
    counts = [0] * HISTOGRAM_BINS
    counts[10], counts[50], counts[90] = 4, 992, 4  # 0.4 % in bin 10, 0.4 % in bin 90: both tails below 0.5 %
    assert training_ranges(SPEC, {"spo2": counts}) == {"spo2": (edges[50], edges[51])}
    counts[10] = 6  # 0.6 %: the lower tail's bin is now inside
    low, high = training_ranges(SPEC, {"spo2": counts})["spo2"]
    assert (low, high) == (edges[10], edges[51])
    assert training_ranges(SPEC, {"spo2": [0] * HISTOGRAM_BINS}) == {}


def exported(spec: DatasetSpec) -> tuple[bytes, Preprocessor, pd.DataFrame]:
    hospitals = frames()
    preprocessing = reduce_stats(spec, [hospital_stats(f, spec, small_cell_threshold=5) for f in hospitals])
    weights = initial_weights(spec, seed=1)
    return export_onnx(spec, preprocessing, weights), Preprocessor.of_run(spec, preprocessing), hospitals[0]


def test_beyond_its_training_range_an_input_is_scored_at_the_edge_in_torch_and_in_onnx_alike() -> None:
    body, preprocessor, frame = exported(SPEC)
    ranges = stored_training_ranges(body)
    assert ranges == preprocessor.ranges and set(ranges) == {f.name for f in SPEC.features if f.type == "numeric"}
    low, high = ranges["spo2"]
    assert 70 < low < high <= 100  # the synthetic patients' SpO2 does not reach the spec's 70
    served = ServedModel.load(body, spec_to_yaml(SPEC), version=1, metric_name="auc", metric=0.5, federation_run="r")
    patient = frame.head(1)
    sweep = pd.concat([patient.assign(spo2=value) for value in (70.0, 75.0, low)], ignore_index=True)
    onnx_risk = served.predict(serving_matrix(sweep, SPEC))
    assert onnx_risk[0] == onnx_risk[1] == onnx_risk[2]  # flat below the range: no extrapolation
    model = model_with_weights(SPEC.model, len(preprocessor.mean), initial_weights(SPEC, seed=1))
    np.testing.assert_allclose(onnx_risk, predict_frame(model, preprocessor, sweep), rtol=1e-5, atol=1e-7)


def test_serving_names_each_input_beyond_what_the_model_saw() -> None:
    body, _, frame = exported(SPEC)
    served = ServedModel.load(body, spec_to_yaml(SPEC), version=1, metric_name="auc", metric=0.5, federation_run="r")
    low, high = served.ranges["spo2"]
    pm_low, pm_high = served.ranges["pm25"]
    rows = pd.concat([frame.head(1), frame.head(1).assign(spo2=70.0, pm25=500.0)], ignore_index=True)
    flags = served.outside_training_range(serving_matrix(rows, SPEC))
    assert flags[0] == []
    assert flags[1] == [{"feature": "spo2", "value": 70.0, "seen": [low, high]},
                        {"feature": "pm25", "value": 500.0, "seen": [pm_low, pm_high]}]


SICK = {"heart_rate": 140, "spo2": 82, "body_temperature": 39.5, "respiratory_rate": 32, "age": 88,
        "asthma_copd": "1", "cardiovascular": "1", "smoker": "current", "pm25": 250}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_clearly_sick_patient_ranks_above_the_99th_percentile_and_its_unseen_values_are_named(seed: int) -> None:
    """The patient a clinician tried (the generator's true risk: 1.00) against the federated model's risks for
    every test patient, each seed's data and model its own."""
    rng = np.random.default_rng(seed)
    hospitals = [generate_city_days(city, 1000, rng).drop(columns="_risk") for city in CITIES]
    splits = [HospitalSplit(f"hospital-{i}", f.iloc[:800], f.iloc[800:]) for i, f in enumerate(hospitals, start=1)]
    _, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=10, local_epochs=1, min_hospitals=5))
    assert run.preprocessing is not None
    served = ServedModel.load(export_onnx(SPEC, run.preprocessing, run.weights), spec_to_yaml(SPEC), version=1,
                              metric_name="auc", metric=0.5, federation_run=run.id)
    test = pd.concat([s.test for s in splits], ignore_index=True)
    sick = test.head(1).assign(**SICK)
    assert true_risk(sick)[0] > 0.99
    risks = served.predict(serving_matrix(test, SPEC))
    (risk,) = served.predict(serving_matrix(sick, SPEC))
    assert risk > np.percentile(risks, 99)
    (flags,) = served.outside_training_range(serving_matrix(sick, SPEC))
    named = {flag["feature"] for flag in flags}
    assert {"spo2", "pm25", "respiratory_rate"} <= named
    assert all(not flag["seen"][0] <= flag["value"] <= flag["seen"][1] for flag in flags)
