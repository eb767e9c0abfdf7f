"""Serving's core, in-process: request decoding, the feature reference read back from ONNX, explanations, drift."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pandas as pd
import pytest

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.preprocess import Preprocessor, serving_matrix, stats_of_frame
from health_mlops.data.synthetic import generate_dataset
from health_mlops.ml.model import build_model, weights_as_numpy
from health_mlops.ml.onnx import export_onnx, feature_reference
from health_mlops.monitoring import ServingMetrics, histogram_quantile
from health_mlops.serving.drift import MIN_ROWS, InputDrift
from health_mlops.serving.explain import contributions
from health_mlops.serving.requests import InvalidRequest, RowEncoder
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


@pytest.fixture(scope="module")
def frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("core-data")
    generate_dataset(root, n_hospitals=1, rows_per_hospital=600, seed=4, split_seed=42, test_fraction=0.2)
    return load_hospitals(root, SPEC)["hospital-1"].frame


def rows_of(frame: pd.DataFrame) -> list[dict]:
    features = frame[[f.name for f in SPEC.features]]
    return json.loads(features.to_json(orient="records"))


def test_both_decoding_paths_give_the_data_files_encoding(frame: pd.DataFrame) -> None:
    encoder = RowEncoder(SPEC)
    rows = rows_of(frame)
    expected = serving_matrix(frame, SPEC)
    np.testing.assert_array_equal(encoder.batch(msgspec.json.encode({"rows": rows})), expected)
    np.testing.assert_array_equal(encoder.one(msgspec.json.encode(rows[0])), expected[:1])
    assert encoder.strict_row(msgspec.json.encode(rows[0])) is not None
    lenient = {**rows[0], "diabetes": int(rows[0]["diabetes"])}  # a category sent as a number
    assert encoder.strict_row(msgspec.json.encode(lenient)) is None
    np.testing.assert_array_equal(encoder.one(msgspec.json.encode(lenient)), expected[:1])


@pytest.mark.parametrize(("change", "field", "hint"), [
    ({"spo2": 101}, "spo2", "100"), ({"smoker": "sometimes"}, "smoker", "never"), ({"age": "forty"}, "age", "number"),
    ({"bmi": None}, "bmi", "number"), ({"extra": 1}, "extra", "not permitted"),
])
def test_an_invalid_field_is_named_with_what_is_allowed(frame: pd.DataFrame, change: dict, field: str,
                                                        hint: str) -> None:
    encoder = RowEncoder(SPEC)
    row = {**rows_of(frame)[0], **change}
    with pytest.raises(InvalidRequest) as caught:
        encoder.one(msgspec.json.encode(row))
    error = caught.value.errors[0]
    assert error["loc"] == ["body", field] and hint in error["msg"]
    rows = rows_of(frame)[:3]
    rows[2] = row
    with pytest.raises(InvalidRequest) as caught:
        encoder.batch(msgspec.json.encode({"rows": rows}))
    assert caught.value.errors[0]["loc"] == ["body", "rows", 2, field]


@pytest.mark.parametrize("body", [b"", b"[" * 5000, b'{"heart_rate": NaN}', b'{"rows": []}', b"1e999"])
def test_bodies_that_are_not_rows_are_refused_with_a_reason(body: bytes) -> None:
    encoder = RowEncoder(SPEC)
    for decode in (encoder.one, encoder.batch):
        with pytest.raises(InvalidRequest) as caught:
            decode(body)
        assert caught.value.errors and caught.value.errors[0]["msg"]


@pytest.fixture(scope="module")
def exported(frame: pd.DataFrame) -> tuple[bytes, Preprocessor]:
    preprocessor = Preprocessor.from_stats(SPEC, stats_of_frame(frame, SPEC))
    model = build_model(SPEC.model, len(preprocessor.mean), seed=0)
    body = export_onnx(SPEC, {"mean": preprocessor.mean.tolist(), "scale": preprocessor.scale.tolist()},
                       weights_as_numpy(model))
    return body, preprocessor


def test_the_feature_reference_is_the_training_population_read_back_from_onnx(
        frame: pd.DataFrame, exported: tuple[bytes, Preprocessor]) -> None:
    reference = feature_reference(SPEC, exported[0])
    assert reference.mean["age"] == pytest.approx(frame["age"].mean(), rel=1e-5)
    assert reference.scale["age"] == pytest.approx(frame["age"].std(ddof=0), rel=1e-4)
    shares = frame["smoker"].value_counts(normalize=True)
    assert reference.frequencies["smoker"] == pytest.approx([shares.get(c, 0.0) for c in ("never", "former", "current")],
                                                            abs=1e-6)
    typical = reference.typical_row(SPEC)
    smoker = [f.name for f in SPEC.features].index("smoker")
    assert typical[smoker] == ["never", "former", "current"].index(shares.idxmax())


class LinearModel:
    """prediction = weights · row: each feature's contribution is known exactly."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights

    def predict(self, features: np.ndarray) -> np.ndarray:
        return features.astype(np.float64) @ self.weights


def test_contributions_are_the_change_from_the_typical_value_largest_first() -> None:
    weights = np.zeros(len(SPEC.features))
    names = [f.name for f in SPEC.features]
    weights[names.index("age")] = 0.01
    weights[names.index("spo2")] = -0.05
    weights[names.index("smoker")] = 0.2
    row = np.zeros((1, len(SPEC.features)), dtype=np.float32)
    typical = [0.0] * len(SPEC.features)
    row[0, names.index("age")], typical[names.index("age")] = 80, 50
    row[0, names.index("spo2")], typical[names.index("spo2")] = 90, 97
    row[0, names.index("smoker")] = 2  # current, typical never
    found = contributions(LinearModel(weights), SPEC, row, typical, top=3)
    assert [(c.feature, round(c.contribution, 6)) for c in found] == [("smoker", 0.4), ("spo2", 0.35), ("age", 0.3)]
    assert found[0].value == "current" and found[0].typical == "never"


def test_drift_scores_shifts_in_standard_deviations_and_category_mix(
        frame: pd.DataFrame, exported: tuple[bytes, Preprocessor]) -> None:
    drift = InputDrift(SPEC, feature_reference(SPEC, exported[0]), window=len(frame))
    matrix = serving_matrix(frame, SPEC)
    drift.observe(matrix[: MIN_ROWS - 1])
    assert drift.scores() == {}  # too few rows to say anything
    drift.observe(matrix[MIN_ROWS - 1:])
    same = drift.scores()
    assert max(same.values()) < 1e-3  # the training rows themselves do not drift
    shifted = matrix.copy()
    age = [f.name for f in SPEC.features].index("age")
    smoker = [f.name for f in SPEC.features].index("smoker")
    shifted[:, age] += 0.5 * frame["age"].std(ddof=0)
    shifted[:, smoker] = 2  # everyone smokes now
    drift.observe(shifted)
    scores = drift.scores()
    assert scores["age"] == pytest.approx(0.5, abs=0.01)
    assert scores["smoker"] == pytest.approx(1 - (frame["smoker"] == "current").mean(), abs=1e-6)
    assert scores["bmi"] < 1e-3


def test_histogram_quantile_bounds_the_quantile_by_its_bucket() -> None:
    metrics = ServingMetrics()
    assert histogram_quantile(metrics.latency, 0.5, endpoint="predict") is None
    for seconds in [0.0004] * 90 + [0.02] * 10:
        metrics.latency.labels("predict").observe(seconds)
    assert histogram_quantile(metrics.latency, 0.5, endpoint="predict") == 0.0005
    assert histogram_quantile(metrics.latency, 0.99, endpoint="predict") == 0.025
