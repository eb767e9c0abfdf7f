"""Serving's core, in-process: request decoding, the feature reference read back from ONNX, explanations, drift."""

from __future__ import annotations

import json
import time

import msgspec
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.preprocess import GlobalPreprocessing, Preprocessor, serving_matrix, stats_of_frame
from health_mlops.data.synthetic import generate_dataset
from health_mlops.ml.model import build_model, weights_as_numpy
from health_mlops.ml.onnx import export_onnx, feature_reference
from health_mlops.monitoring import ServingMetrics, histogram_quantile
from health_mlops.serving.drift import MIN_ROWS, SIGNIFICANT_PSI, InputDrift, equal_mass_bins
from health_mlops.serving.explain import contributions
from health_mlops.serving.model import ChampionWatcher, ServedModel
from health_mlops.serving.predictor import NoChampion, Predictor
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
    validated = encoder.row_model.model_validate(rows[0])  # the dashboard form's path
    np.testing.assert_array_equal(encoder.matrix_of([validated]), expected[:1])


def test_a_request_may_write_a_category_as_the_spec_codes_it_in_any_case(frame: pd.DataFrame) -> None:
    encoder = RowEncoder(SPEC)
    row = rows_of(frame)[0]
    canonical = {**row, "sex": "M", "diabetes": "1", "smoker": "former"}
    spelled = {**row, "sex": "Male", "diabetes": "yes", "smoker": " EX-SMOKER "}
    expected = encoder.one(msgspec.json.encode(canonical))
    np.testing.assert_array_equal(encoder.one(msgspec.json.encode(spelled)), expected)
    np.testing.assert_array_equal(encoder.batch(msgspec.json.encode({"rows": [spelled, canonical]})),
                                  np.vstack([expected, expected]))
    with pytest.raises(InvalidRequest, match="'F' or 'M'"):
        encoder.one(msgspec.json.encode({**row, "sex": "other"}))


@pytest.mark.parametrize(("change", "field", "hint"), [
    ({"spo2": 101}, "spo2", "100"), ({"smoker": "sometimes"}, "smoker", "never"), ({"age": "forty"}, "age", "number"),
    ({"bmi": None}, "bmi", "number"), ({"extra": 1}, "extra", "not permitted"),
    # strict: a boolean or a numeric string is not a number, a number or a boolean is not a category
    ({"age": True}, "age", "number"), ({"age": "50"}, "age", "number"), ({"diabetes": 0}, "diabetes", "'0'"),
    ({"diabetes": False}, "diabetes", "'0'"),
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
    preprocessing = GlobalPreprocessing(count=len(frame), mean=preprocessor.mean.tolist(),
                                        scale=preprocessor.scale.tolist())
    body = export_onnx(SPEC, preprocessing, weights_as_numpy(model))
    return body, preprocessor


@pytest.fixture(scope="module")
def exported_with_histograms(frame: pd.DataFrame) -> bytes:
    """A model exported as a federated run exports it: preprocessing from hospitals' summed stats."""
    from health_mlops.fl.stats import hospital_stats, reduce_stats

    halves = [frame.iloc[: len(frame) // 2], frame.iloc[len(frame) // 2:]]
    preprocessing = reduce_stats(SPEC, [hospital_stats(part, SPEC, small_cell_threshold=5) for part in halves])
    model = build_model(SPEC.model, len(preprocessing.mean), seed=0)
    return export_onnx(SPEC, preprocessing, weights_as_numpy(model))


def test_the_feature_reference_is_the_training_population_read_back_from_onnx(
        frame: pd.DataFrame, exported: tuple[bytes, Preprocessor]) -> None:
    reference = feature_reference(SPEC, exported[0])
    assert reference.mean["age"] == pytest.approx(frame["age"].mean(), rel=1e-5)
    assert reference.scale["age"] == pytest.approx(frame["age"].std(ddof=0), rel=1e-4)
    shares = frame["smoker"].value_counts(normalize=True)
    expected = [shares.get(c, 0.0) for c in ("never", "former", "current")]
    assert reference.frequencies["smoker"] == pytest.approx(expected, abs=1e-6)
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


def test_drift_is_the_population_stability_index_against_the_training_histograms(
        frame: pd.DataFrame, exported_with_histograms: bytes) -> None:
    reference = feature_reference(SPEC, exported_with_histograms)
    assert set(reference.histograms) == {f.name for f in SPEC.features if f.type == "numeric"}
    drift = InputDrift(SPEC, reference, window=len(frame))
    matrix = serving_matrix(frame, SPEC)
    drift.observe(matrix[: MIN_ROWS - 1])
    assert drift.scores() == {}  # too few rows to say anything
    drift.observe(matrix[MIN_ROWS - 1:])
    assert max(drift.scores().values()) < 0.1  # the training rows themselves read as stable (PSI < 0.1)
    shifted = matrix.copy()
    names = [f.name for f in SPEC.features]
    shifted[:, names.index("age")] += frame["age"].std(ddof=0)  # everyone a standard deviation older
    shifted[:, names.index("smoker")] = 2  # and smoking
    drift.observe(shifted)
    scores = drift.scores()
    assert scores["age"] > SIGNIFICANT_PSI and scores["smoker"] > SIGNIFICANT_PSI
    assert scores["bmi"] < 0.1
    # Every scored row now smokes: served shares (never, former, current) = (0, 0, 1), empty bins floored at 1e-4.
    trained = [(frame["smoker"] == c).mean() for c in ("never", "former", "current")]
    served = [1e-4, 1e-4, 1.0]
    assert scores["smoker"] == pytest.approx(sum((s - t) * np.log(s / t) for s, t in zip(served, trained)), rel=1e-6)


def test_equal_mass_bins_merge_the_fine_grid_into_bins_of_similar_share() -> None:
    edges = np.linspace(0, 100, 101)
    counts = np.zeros(100)
    counts[:10] = 90  # 900 rows below 10, 9 % of all rows in each of those fine bins
    counts[10:] = 100 / 90  # 100 rows spread over 10 to 100
    inner, shares = equal_mass_bins(edges, counts)
    assert len(shares) == len(inner) + 1 and shares.sum() == pytest.approx(1.0) and (np.diff(inner) > 0).all()
    assert inner[-1] <= 11  # the sparse tail is one bin
    assert ((0.05 < shares) & (shares < 0.2)).all()
    assert equal_mass_bins(edges, np.zeros(100))[1].tolist() == [1.0]


def test_histogram_quantile_bounds_the_quantile_by_its_bucket() -> None:
    metrics = ServingMetrics()
    assert histogram_quantile(metrics.latency, 0.5, endpoint="predict") is None
    for seconds in [0.0004] * 90 + [0.02] * 10:
        metrics.latency.labels("predict").observe(seconds)
    assert histogram_quantile(metrics.latency, 0.5, endpoint="predict") == 0.0005
    assert histogram_quantile(metrics.latency, 0.99, endpoint="predict") == 0.025


def test_the_predictor_is_the_one_door_from_a_request_to_a_prediction_and_its_counts(
        frame: pd.DataFrame, exported_with_histograms: bytes) -> None:
    """What the API and the dashboard ask of serving, asked of the Predictor alone: the request schemas, decoding
    a body or a form, the champion, predicting, and what was served (counts, rows, latency, the exposition)."""
    watcher = ChampionWatcher(registry=None, poll_s=60)  # type: ignore[arg-type]  # never started: set by hand
    predictor = Predictor(SPEC, watcher, ServingMetrics())
    row_schema, batch_schema = predictor.request_schemas()
    assert set(row_schema["properties"]) == {f.name for f in SPEC.features} and "rows" in batch_schema["properties"]
    rows = rows_of(frame)[:3]
    assert predictor.current is None
    with pytest.raises(NoChampion):
        predictor.predict("batch", predictor.decode_batch(msgspec.json.encode({"rows": rows})), 0.0)
    watcher.current = ServedModel.load(exported_with_histograms, SPEC.model_dump_json(), version=3,
                                       metric_name="auc", metric=0.9, federation_run="run-1")
    assert predictor.current is watcher.current
    model, predictions = predictor.predict("batch", predictor.decode_batch(msgspec.json.encode({"rows": rows})),
                                           time.perf_counter())
    assert model.version == 3 and predictions.shape == (3,)
    form = predictor.decode_form(rows[0])
    np.testing.assert_array_equal(form, predictor.decode_one(msgspec.json.encode(rows[0])))
    with pytest.raises(ValidationError, match="spo2"):
        predictor.decode_form({**rows[0], "spo2": 101})
    predictor.count_invalid("ui", 1)

    served = predictor.summary()
    assert served.requests[("batch", "ok")] == 1 and served.requests[("batch", "no_model")] == 1
    assert served.invalid_rows == {"ui": 1} and served.latency["batch"][0] is not None
    assert served.latency["predict"] == (None, None)
    exposition = predictor.exposition().decode()
    assert "health_mlops_predicted_rows_total 3.0" in exposition  # the batch's rows
    assert "health_mlops_model_version 3.0" in exposition
