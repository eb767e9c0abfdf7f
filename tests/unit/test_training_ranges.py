"""Honest outside what the model saw: each numeric input is clamped to the range the training rows covered (from
the run's federated histograms), in training, evaluation and the exported graph alike, and serving names every
input beyond it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from health_mlops.data.preprocess import HISTOGRAM_BINS, Preprocessor, histogram_edges, training_ranges
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.fl.hospital import hospital_stats, reduce_stats
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.model import initial_weights, model_with_weights
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
