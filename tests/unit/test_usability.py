"""Which hospitals can take part in training, and what is said about the others."""

from __future__ import annotations

import numpy as np
import pandas as pd

from health_mlops.data.hospital import HospitalData
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.data.split import HospitalSplit
from health_mlops.data.usability import assess_sites, excluded, size_warnings, usable, warning_about_test_rows
from health_mlops.data.validate import FileReport
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")
TARGET = SPEC.target.name


def hospital(name: str, outcomes: list[int], quarantined: int = 0) -> HospitalData:
    report = FileReport(file=f"{name}.csv", rows_read=len(outcomes) + quarantined, rows_valid=len(outcomes),
                        rows_quarantined=quarantined, reasons={}, ignored_columns=[], quarantined=[])
    rows = generate_city_days(CITIES[0], len(outcomes), np.random.default_rng(0)).drop(columns="_risk")
    return HospitalData(name, rows.assign(**{TARGET: outcomes}), [report])


def test_a_hospital_without_valid_rows_is_left_out_with_why_and_a_single_class_is_a_warning() -> None:
    hospitals = {"a": hospital("a", [0, 1, 0]), "b": hospital("b", [], quarantined=40), "c": hospital("c", []),
                 "d": hospital("d", [0, 0, 0, 0])}
    sites = assess_sites(hospitals, SPEC)
    assert excluded(sites) == {"b": "no valid rows: all 40 rows invalid (quarantined)", "c": "no valid rows: no rows"}
    assert list(usable(hospitals, sites)) == ["a", "d"]
    assert sites["a"].warnings == () and sites["b"].warnings == ()
    (warning,) = sites["d"].warnings
    assert f"every valid row has {TARGET} = 0" in warning and "AUC" in warning
    assert sites["b"].to_json() == {"rows_valid": 0, "rows_quarantined": 40, "missing_values": {},
                                    "excluded": "no valid rows: all 40 rows invalid (quarantined)", "warnings": []}


def test_values_not_measured_are_counted_and_a_feature_never_measured_is_a_warning() -> None:
    some = hospital("some", [0, 1, 0, 1])
    some.frame.loc[:1, "spo2"] = np.nan
    never = hospital("never", [0, 1, 0])
    never.frame["spo2"] = np.nan
    sites = assess_sites({"some": some, "never": never}, SPEC)
    assert sites["some"].missing_values == {"spo2": 2} and sites["some"].warnings == ()
    assert sites["never"].missing_values == {"spo2": 3} and sites["never"].excluded is None
    (warning,) = sites["never"].warnings
    assert "spo2 is never measured here" in warning and "mean" in warning


def test_test_rows_that_cannot_measure_an_auc_are_said_so() -> None:
    assert warning_about_test_rows(pd.DataFrame({TARGET: [0, 1, 0]}), SPEC) is None
    one_class = warning_about_test_rows(pd.DataFrame({TARGET: [0, 0, 0, 0, 0]}), SPEC)
    assert one_class is not None and f"its 5 test rows all have {TARGET} = 0" in one_class and "null" in one_class
    assert "no test rows" in str(warning_about_test_rows(pd.DataFrame({TARGET: []}), SPEC))


def test_a_site_too_small_to_train_or_test_on_is_told_what_happens_to_it() -> None:
    """A real RCT's sites of 22 and 3 patients: `data validate` said nothing; `train` then failed to learn there."""
    frame = generate_city_days(CITIES[0], 60, np.random.default_rng(0)).drop(columns="_risk")
    target = SPEC.target.name
    frame[target] = ["1" if i < 3 else "0" for i in range(60)]
    tiny = HospitalSplit("hospital-9", frame.iloc[2:4], frame.iloc[50:51])
    said = size_warnings(tiny, SPEC, validation_fraction=0.2)
    assert any("its 1 test rows all have" in w for w in said)
    assert any("only 1 of its 2 training rows have the event" in w for w in said)
    assert any("too few to hold out 10 validation rows: it trains on all of them" in w for w in said)
    roomy = generate_city_days(CITIES[0], 400, np.random.default_rng(1)).drop(columns="_risk")
    roomy[target] = ["1" if i % 5 == 0 else "0" for i in range(400)]
    assert size_warnings(HospitalSplit("hospital-1", roomy.iloc[:320], roomy.iloc[320:]), SPEC,
                         validation_fraction=0.2) == []
