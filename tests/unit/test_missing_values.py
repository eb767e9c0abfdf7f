"""Values the spec allows to be "not measured": validated apart from invalid ones, filled in with the federation's
mean or most common category from counts and sums, flagged by an indicator input, and handled the same way by
the exported model and the predict API."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import yaml

from health_mlops.data.io import read_table
from health_mlops.data.preprocess import (MISSING_SUFFIX, Preprocessor, encoded_columns, imputation, serving_matrix,
                                          stats_of_frame)
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.data.validate import validate_table
from health_mlops.fl.stats import hospital_stats, reduce_stats, suppressed_cells
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.model import build_model, weights_as_numpy
from health_mlops.ml.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, feature_reference
from health_mlops.serving.requests import InvalidRequest, RowEncoder
from health_mlops.spec import DatasetSpec, MissingPolicy, SpecError, load_spec, load_spec_text, spec_to_yaml

BASE = load_spec("health-risk")


def with_missing(**policies: MissingPolicy) -> DatasetSpec:
    features = tuple(f.model_copy(update={"missing": policies[f.name]}) if f.name in policies else f
                     for f in BASE.features)
    return BASE.model_copy(update={"features": features})


SPEC = with_missing(spo2=MissingPolicy(codes=("0", "-9"), indicator=True),
                    smoker=MissingPolicy(codes=("unknown",)))


def hospital_frames(rows: int = 300) -> list[pd.DataFrame]:
    rng = np.random.default_rng(11)
    return [generate_city_days(city, rows, rng).drop(columns="_risk") for city in CITIES[:3]]


def validated(frame: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    return validate_table(read_table(path), SPEC).frame


def test_codes_and_empty_fields_are_missing_values_reported_apart_from_invalid_ones(tmp_path: Path) -> None:
    frame = hospital_frames()[0].head(8).astype({"spo2": object, "age": object})
    frame.loc[0, "spo2"] = 0
    frame.loc[1, "spo2"] = "-9.0"
    frame.loc[2, "spo2"] = ""
    frame.loc[3, "spo2"] = 20  # out of range and not a code: invalid
    frame.loc[4, "smoker"] = "Unknown"
    frame.loc[5, "age"] = ""  # age allows no missing value: invalid
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    table = validate_table(read_table(path), SPEC)
    assert table.report.rows_valid == 6 and table.report.rows_quarantined == 2
    assert table.report.missing_values == {"spo2": 3, "smoker": 1}
    assert table.report.reasons == {"out_of_range": 1, "missing_value": 1}
    assert table.frame["spo2"].isna().sum() == 3 and table.frame["smoker"].isna().sum() == 1


def test_federated_fill_in_and_standardisation_equal_the_pooled_ones_from_counts_and_sums(tmp_path: Path) -> None:
    frames = hospital_frames()
    frames[1] = frames[1].assign(spo2=frames[1]["spo2"].where(np.arange(300) % 3 != 0, 0),
                                 smoker=frames[1]["smoker"].where(np.arange(300) % 4 != 0, "unknown"))
    parts = [validated(f, tmp_path) for f in frames]
    preprocessing = reduce_stats(SPEC, [hospital_stats(p, SPEC, small_cell_threshold=5) for p in parts])
    federated = Preprocessor.of_run(SPEC, preprocessing)
    pooled_rows = pd.concat(parts, ignore_index=True)
    pooled = Preprocessor.from_stats(SPEC, stats_of_frame(pooled_rows, SPEC))
    np.testing.assert_allclose(federated.fill, pooled.fill, rtol=1e-12)
    np.testing.assert_allclose(federated.mean, pooled.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(federated.scale, pooled.scale, rtol=1e-9)
    # The fill-in is the mean of measured values (a 0 taken at face value would pull it far down) and the most
    # common category.
    fill = imputation(SPEC, federated.fill)
    assert fill["spo2"] == pytest.approx(pooled_rows["spo2"].mean(skipna=True), rel=1e-12)
    assert fill["smoker"] == pooled_rows["smoker"].mode()[0]
    # After filling in, the columns are standardised exactly: mean 0, standard deviation 1 (before the inputs are
    # clamped to the training ranges, which moves the 1 % of rows beyond them).
    x = replace(federated, ranges={}).features(pooled_rows)
    column = encoded_columns(SPEC).index("spo2")
    assert abs(float(x[:, column].mean())) < 1e-5 and float(x[:, column].std()) == pytest.approx(1, abs=1e-4)
    indicator = x[:, encoded_columns(SPEC).index(f"spo2{MISSING_SUFFIX}")]
    assert len(np.unique(indicator)) == 2  # 1 where spo2 was missing, 0 elsewhere (standardised)
    assert not np.isnan(x).any()


def test_a_feature_missing_for_a_few_patients_is_withheld_in_round_0(tmp_path: Path) -> None:
    frame = hospital_frames()[0].copy()
    frame.loc[:2, "spo2"] = 0  # 3 patients: below a threshold of 5, their count would single them out
    stats = hospital_stats(validated(frame, tmp_path), SPEC, small_cell_threshold=5)
    columns = encoded_columns(SPEC)
    for name in ("spo2", f"spo2{MISSING_SUFFIX}"):
        j = columns.index(name)
        assert stats.sums[j] is None and stats.observed[j] is None
    assert stats.observed[columns.index("age")] == len(frame)
    assert suppressed_cells(stats)["categories"] == 2


def test_the_exported_model_fills_in_and_flags_missing_values_as_training_did(tmp_path: Path) -> None:
    frames = hospital_frames()
    frames[0] = frames[0].assign(spo2=frames[0]["spo2"].where(np.arange(300) % 2 == 0, 0),
                                 smoker=frames[0]["smoker"].where(np.arange(300) % 5 != 0, "unknown"))
    parts = [validated(f, tmp_path) for f in frames]
    preprocessing = reduce_stats(SPEC, [hospital_stats(p, SPEC, small_cell_threshold=5) for p in parts])
    preprocessor = Preprocessor.of_run(SPEC, preprocessing)
    model = build_model(SPEC.model, len(preprocessor.mean), seed=3)
    body = export_onnx(SPEC, preprocessing, weights_as_numpy(model))
    session = onnxruntime.InferenceSession(body, providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: serving_matrix(parts[0], SPEC)})
    np.testing.assert_allclose(onnx_out, predict_frame(model, preprocessor, parts[0]), rtol=1e-4, atol=1e-6)
    reference = feature_reference(SPEC, body)  # the indicator columns do not shift the features' read-back
    assert reference.mean["spo2"] == pytest.approx(preprocessing.fill[encoded_columns(SPEC).index("spo2")],
                                                   rel=1e-6)


def test_the_predict_api_takes_null_or_a_code_where_the_spec_allows_missing() -> None:
    encoder = RowEncoder(SPEC)
    row = {name: value.item() if hasattr(value, "item") else value
           for name, value in hospital_frames()[0].drop(columns=[SPEC.target.name, "date", "city"],
                                                        errors="ignore").iloc[0].items()
           if name in SPEC.feature_names}
    spo2 = SPEC.feature_names.index("spo2")
    for value in (None, 0, -9):
        matrix = encoder.one(json.dumps({**row, "spo2": value}).encode())
        assert np.isnan(matrix[0, spo2])
        batch = encoder.batch(json.dumps({"rows": [row, {**row, "spo2": value}]}).encode())
        assert not np.isnan(batch[0, spo2]) and np.isnan(batch[1, spo2])
    assert np.isnan(encoder.one(json.dumps({**row, "smoker": "unknown"}).encode())[0, SPEC.feature_names.index(
        "smoker")])
    for field, value in (("spo2", 20), ("age", None)):  # out of range; missing where the spec does not allow it
        with pytest.raises(InvalidRequest) as caught:
            encoder.one(json.dumps({**row, field: value}).encode())
        assert caught.value.errors[0]["loc"][-1] == field


@pytest.mark.parametrize(("feature", "policy", "message"), [
    ("spo2", {"impute": "mode"}, "imputes its mean"),
    ("spo2", {"codes": ["n/a"]}, "is not a number"),
    ("smoker", {"impute": "mean"}, "most common category"),
    ("smoker", {"codes": ["never"]}, "also categories"),
])
def test_a_missing_policy_that_cannot_work_is_refused_naming_the_feature(feature: str, policy: dict,
                                                                         message: str) -> None:
    raw = json.loads(json.dumps(BASE.model_dump(mode="json", exclude_none=True)))
    next(f for f in raw["features"] if f["name"] == feature)["missing"] = policy
    with pytest.raises(SpecError, match=message):
        load_spec_text(yaml.safe_dump(raw))


def test_a_spec_with_missing_policies_survives_its_yaml_round_trip() -> None:
    again = load_spec_text(spec_to_yaml(SPEC))
    assert again.by_name["spo2"].missing == MissingPolicy(codes=("0", "-9"), indicator=True)
    assert spec_to_yaml(SPEC).count("missing:") == 2
