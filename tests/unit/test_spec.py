from pathlib import Path

import pytest

from health_mlops.spec import SpecError, load_spec


def test_health_risk_spec_has_every_feature_of_the_design() -> None:
    spec = load_spec("health-risk")
    assert spec.task == "binary"
    assert spec.target.name == "adverse_event_7d"
    expected = {"heart_rate", "spo2", "body_temperature", "respiratory_rate", "steps", "sleep_hours", "pm25",
                "pm10", "no2", "o3", "aqi", "temperature", "humidity", "pressure", "age", "sex", "bmi",
                "asthma_copd", "diabetes", "cardiovascular", "smoker"}
    assert set(spec.feature_names) == expected
    sources = {f.source.value for f in spec.features}
    assert {"wearable", "air_quality", "weather", "demographic", "clinical"} <= sources
    assert spec.by_name["asthma_copd"].categories == ("0", "1")  # YAML ints become text categories
    assert spec.by_name["spo2"].allowed() == "70 to 100 %"
    assert spec.primary_metric == "auc"


def test_diabetes_spec_is_a_regression_task() -> None:
    spec = load_spec("diabetes")
    assert spec.task == "regression"
    assert spec.primary_metric == "r2"
    assert spec.target_feature.type == "numeric"
    assert len(spec.features) == 10


@pytest.mark.parametrize(("body", "complaint"), [
    ("- {name: a, type: numeric, min: 0, max: 1, source: clinical}\n"
     "  - {name: a, type: numeric, min: 0, max: 1, source: clinical}", "features listed twice: a"),
    ("- {name: a, type: numeric, source: clinical}", "needs min and max"),
    ("- {name: a, type: categorical, categories: [x, x], source: clinical}", "distinct categories"),
    ("- {name: a, type: numeric, min: 0, max: 1, source: the_moon}", "source"),
])
def test_invalid_spec_is_refused_naming_the_file(tmp_path: Path, body: str, complaint: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\ntask: binary\ntarget: {{name: y}}\nfeatures:\n  {body}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert complaint in str(info.value)


def test_unknown_spec_name_lists_the_built_ins() -> None:
    with pytest.raises(SpecError, match="built-in specs: health-risk, diabetes"):
        load_spec("no-such-task")


def test_a_site_with_no_event_or_only_events_does_not_flag_everyone_or_no_one() -> None:
    """The threshold follows the training rows' event rate; a rate of 0 would flag every patient (every risk is at
    least 0) and a rate of 1 none: such rows say nothing of where to flag, so 0.5."""
    spec = load_spec("health-risk")
    assert spec.threshold_for(0.07) == 0.07
    assert spec.threshold_for(0.0) == 0.5 and spec.threshold_for(1.0) == 0.5
    fixed = spec.model_copy(update={"decision_threshold": 0.2})
    assert fixed.threshold_for(0.0) == 0.2  # the spec's own threshold is kept
