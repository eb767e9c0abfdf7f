"""Validating raw rows against a dataset spec: every valid row is kept, every invalid one quarantined.

Each quarantined row keeps its line in the file and every reason it failed, so a hospital's IT team can fix
the export; quarantined rows are written aside, never silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from health_mlops.data.io import RawTable, write_csv
from health_mlops.errors import DataError
from health_mlops.spec import DatasetSpec, Feature
from health_mlops.system.files import open_private

# Spellings of "no value" that exports use; compared case-insensitively after stripping blanks.
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})


class Reason(str, Enum):
    missing_value = "missing_value"
    wrong_type = "wrong_type"
    out_of_range = "out_of_range"
    unknown_category = "unknown_category"
    duplicate_header = "duplicate_header"
    wrong_field_count = "wrong_field_count"


class Problem(BaseModel):
    column: str | None
    reason: Reason
    message: str


class QuarantinedRow(BaseModel):
    line: int
    problems: list[Problem]

    @property
    def summary(self) -> str:
        return "; ".join(p.message for p in self.problems)


class FileReport(BaseModel):
    """What validation found in one file."""

    file: str
    rows_read: int
    rows_valid: int
    rows_quarantined: int
    missing_values: dict[str, int] = {}  # per column: valid rows where the spec allows "not measured"
    reasons: dict[str, int]
    ignored_columns: list[str]
    quarantined: list[QuarantinedRow]


@dataclass
class ValidatedTable:
    """The valid rows, typed (numeric as float, categories as their canonical text), and the report."""

    frame: pd.DataFrame
    report: FileReport
    quarantined_rows: pd.DataFrame
    lines: np.ndarray  # each valid row's line in the file


def _is_missing(values: pd.Series) -> np.ndarray:
    text = values.astype(str).str.strip().str.lower()
    return (values.isna() | text.isin(MISSING_TOKENS)).to_numpy()


def _is_missing_code(values: pd.Series, feature: Feature) -> np.ndarray:
    """Which values are one of the feature's "not measured" codes (numbers compared as numbers: 0 is 0.0)."""
    assert feature.missing is not None
    codes = feature.missing.codes
    if not codes:
        return np.zeros(len(values), dtype=bool)
    text = values.map(_canonical_text)
    if feature.type == "numeric":
        parsed = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        return np.isin(parsed, np.array([float(c) for c in codes]))
    return text.str.lower().isin({c.lower() for c in codes}).to_numpy()


def _canonical_text(value: object) -> str:
    # Parquet may hold a 0/1 category as 1.0; its text is "1".
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _check_numeric(values: pd.Series, feature: Feature, missing: np.ndarray
                   ) -> tuple[np.ndarray, dict[Reason, np.ndarray], list[str]]:
    text = values.map(_canonical_text)
    parsed = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    wrong_type = ~missing & np.isnan(parsed)
    with np.errstate(invalid="ignore"):
        out_of_range = ~missing & ~wrong_type & ~((parsed >= feature.min) & (parsed <= feature.max))
    return parsed, {Reason.wrong_type: wrong_type, Reason.out_of_range: out_of_range}, text.tolist()


def _check_categorical(values: pd.Series, feature: Feature, missing: np.ndarray
                       ) -> tuple[np.ndarray, dict[Reason, np.ndarray], list[str]]:
    text = values.map(_canonical_text)
    canonical = text.str.lower().map(feature.spellings())
    unknown = ~missing & canonical.isna().to_numpy()
    typed = canonical.to_numpy(dtype=object)
    typed[missing] = None
    return typed, {Reason.unknown_category: unknown}, text.tolist()


def _message(feature: Feature, reason: Reason, shown: str) -> str:
    name = feature.name
    if reason is Reason.missing_value:
        return f"{name}: missing value"
    if reason is Reason.wrong_type:
        return f"{name}: {shown!r} is not a number"
    if reason is Reason.out_of_range:
        return f"{name}: {shown} is out of range (allowed {feature.allowed()})"
    return f"{name}: unknown category {shown!r} (allowed {feature.allowed()})"


def validate_table(table: RawTable, spec: DatasetSpec, *, require_site: bool = False,
                   require_target: bool = True) -> ValidatedTable:
    """Check every row of `table` against `spec`; raise `DataError` only if the file cannot be used at all.

    `require_target=False` checks the features alone (rows to predict for)."""
    columns: list[Feature] = [*spec.features, *([spec.target_feature] if require_target else [])]
    missing_columns = [f.name for f in columns if f.name not in table.header]
    site = spec.site_column if require_site else None
    if site is not None and site not in table.header:
        missing_columns.append(site)
    if missing_columns:
        raise DataError(table.path, f"missing required column(s): {', '.join(missing_columns)}")
    kept_columns = [f.name for f in columns] + ([site] if site else [])
    ignored = [c for c in table.header if c not in kept_columns]

    rows = table.rows
    n = len(rows)
    problems: dict[int, list[Problem]] = {}

    def add(mask: np.ndarray, problem_of) -> None:
        for i in np.flatnonzero(mask):
            problems.setdefault(int(i), []).append(problem_of(int(i)))

    # A header line repeated inside the file (files concatenated by hand) is one problem, not 20.
    header_repeat = np.ones(n, dtype=bool)
    for name in kept_columns:
        header_repeat &= (rows[name].astype(str).str.strip() == name).to_numpy()
    add(header_repeat, lambda i: Problem(column=None, reason=Reason.duplicate_header,
                                         message="repeated header line"))
    checked = ~header_repeat

    typed: dict[str, np.ndarray] = {}
    not_measured: dict[str, np.ndarray] = {}  # values the spec allows to be missing (imputed in training)
    for feature in columns:
        values = rows[feature.name]
        missing = _is_missing(values) & checked
        if feature.missing is not None:
            missing |= _is_missing_code(values, feature) & checked
        if feature.type == "numeric":
            parsed, failures, shown = _check_numeric(values, feature, missing)
        else:
            parsed, failures, shown = _check_categorical(values, feature, missing)
        typed[feature.name] = parsed
        if feature.missing is not None:
            not_measured[feature.name] = missing
        else:
            add(missing, lambda i, f=feature: Problem(column=f.name, reason=Reason.missing_value,
                                                      message=_message(f, Reason.missing_value, "")))
        for reason, mask in failures.items():
            add(mask & checked, lambda i, f=feature, r=reason, s=shown: Problem(
                column=f.name, reason=r, message=_message(f, r, s[i])))
    labels = spec.target.labels if require_target and spec.task == "binary" else None
    if labels is not None:  # the file's labels become the 0 and 1 everything downstream reads
        typed[spec.target.name] = np.array([str(labels[v]) if v in labels else None for v in typed[spec.target.name]],
                                           dtype=object)  # an unknown label (not in the map) is quarantined
    if site is not None:
        site_missing = _is_missing(rows[site]) & checked
        add(site_missing, lambda i: Problem(column=site, reason=Reason.missing_value,
                                            message=f"{site}: missing value"))
        typed[site] = rows[site].map(_canonical_text).to_numpy(dtype=object)

    bad = np.zeros(n, dtype=bool)
    bad[list(problems)] = True
    quarantined = [QuarantinedRow(line=int(table.lines[i]), problems=problems[i]) for i in sorted(problems)]
    quarantined += [
        QuarantinedRow(line=m.line, problems=[Problem(
            column=None, reason=Reason.wrong_field_count,
            message=f"has {len(m.fields)} fields, the header has {len(table.header)}")])
        for m in table.malformed]
    quarantined.sort(key=lambda q: q.line)

    frame = pd.DataFrame({name: values[~bad] for name, values in typed.items()})
    missing_values = {name: int(mask[~bad].sum()) for name, mask in not_measured.items() if mask[~bad].any()}
    for feature in columns:
        if feature.type == "numeric":
            frame[feature.name] = frame[feature.name].astype(np.float64)
    frame = frame.reset_index(drop=True)

    reasons: dict[str, int] = {}
    for q in quarantined:
        for p in q.problems:
            reasons[p.reason.value] = reasons.get(p.reason.value, 0) + 1
    report = FileReport(
        file=str(table.path), rows_read=table.rows_read, rows_valid=int((~bad).sum()),
        rows_quarantined=len(quarantined), missing_values=missing_values, reasons=reasons, ignored_columns=ignored,
        quarantined=quarantined)
    return ValidatedTable(frame=frame, report=report, quarantined_rows=_quarantined_rows(table, bad, quarantined),
                          lines=table.lines[~bad])


def _quarantined_rows(table: RawTable, bad: np.ndarray, quarantined: list[QuarantinedRow]) -> pd.DataFrame:
    """The quarantined rows as they were in the file, each with its line and reasons first."""
    parts = [table.rows[bad].astype(str)]
    if table.malformed:
        width = len(table.header)
        padded = [(m.fields + [""] * width)[:width] for m in table.malformed]
        parts.append(pd.DataFrame(padded, columns=table.header))
    raw = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    lines = np.concatenate([table.lines[bad], np.array([m.line for m in table.malformed], dtype=np.int64)])
    reason_of = {q.line: q.summary for q in quarantined}
    raw.insert(0, "reason", [reason_of[int(line)] for line in lines])
    raw.insert(0, "line", lines)
    return raw.sort_values("line", kind="stable").reset_index(drop=True)


def write_quality_report(validated: ValidatedTable, out_dir: Path) -> tuple[Path, Path]:
    """Write `<file>.report.json` and `<file>.quarantine.csv` into `out_dir`; returns both paths. Quarantined
    rows are patient records: the folder is 0700 and the files 0600."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o700)
    name = Path(validated.report.file).name
    report_path = out_dir / f"{name}.report.json"
    quarantine_path = out_dir / f"{name}.quarantine.csv"
    with open_private(report_path) as report:
        report.write(validated.report.model_dump_json(indent=2))
    with open_private(quarantine_path) as quarantine:
        write_csv(validated.quarantined_rows, quarantine)
    return report_path, quarantine_path


def reports_to_json(reports: list[FileReport]) -> str:
    return json.dumps([r.model_dump(mode="json") for r in reports], indent=2)
