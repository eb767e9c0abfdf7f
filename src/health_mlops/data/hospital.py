"""A hospital's data: every file of its folder validated against the spec, the valid rows together.

A data root is either a folder of hospital folders (`hospital-1/`, `hospital-2/`, ...), or one file (or a
folder of files) holding several hospitals, told apart by the spec's site column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from health_mlops.data.io import RawTable, data_files, hospital_folders, natural_key, read_table
from health_mlops.data.validate import FileReport, ValidatedTable, validate_table, write_quality_report
from health_mlops.errors import DataError
from health_mlops.spec import DatasetSpec


@dataclass
class HospitalData:
    """One hospital's valid rows (typed, in file order) and the validation report of each of its files."""

    hospital_id: str
    frame: pd.DataFrame
    reports: list[FileReport] = field(default_factory=list)

    @property
    def rows_valid(self) -> int:
        return len(self.frame)

    @property
    def rows_quarantined(self) -> int:
        return sum(r.rows_quarantined for r in self.reports)


def validate_tables(tables: list[RawTable], spec: DatasetSpec, *, require_site: bool,
                    quality_dir: Path | None) -> list[ValidatedTable]:
    """Validate each table; when `quality_dir` is given, write each file's report and quarantined rows there."""
    validated = []
    for table in tables:
        result = validate_table(table, spec, require_site=require_site)
        if quality_dir is not None:
            write_quality_report(result, quality_dir)
        validated.append(result)
    return validated


def _hospital(hospital_id: str, tables: list[RawTable], spec: DatasetSpec,
              quality_dir: Path | None) -> HospitalData:
    out = quality_dir / hospital_id if quality_dir is not None else None
    validated = validate_tables(tables, spec, require_site=False, quality_dir=out)
    frame = pd.concat([v.frame for v in validated], ignore_index=True)
    return HospitalData(hospital_id, frame, [v.report for v in validated])


def _folder_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(folder, "no such folder")
    files = data_files(folder)
    if not files:
        raise DataError(folder, "no CSV or Parquet files in this folder")
    return files


def load_hospital(folder: Path, spec: DatasetSpec, *, hospital_id: str | None = None,
                  quality_dir: Path | None = None) -> HospitalData:
    """Read and validate every data file in one hospital's folder (its name is the default hospital id)."""
    folder = Path(folder)
    return _hospital(hospital_id or folder.name, [read_table(f) for f in _folder_files(folder)], spec, quality_dir)


def load_hospitals(root: Path, spec: DatasetSpec, *, quality_dir: Path | None = None) -> dict[str, HospitalData]:
    """Every hospital under a data root, keyed by hospital id in natural order."""
    root = Path(root)
    if not root.exists():
        raise DataError(root, "no such file or folder")
    if root.is_dir():
        folders = hospital_folders(root)
        if folders:
            return {f.name: load_hospital(f, spec, quality_dir=quality_dir) for f in folders}
        files = _folder_files(root)
    else:
        files = [root]
    tables = [read_table(f) for f in files]
    if spec.site_column is None or spec.site_column not in tables[0].header:
        name = root.stem if root.is_file() else root.name
        return {name: _hospital(name, tables, spec, quality_dir)}
    return _split_by_site(tables, spec, quality_dir)


def _split_by_site(tables: list[RawTable], spec: DatasetSpec, quality_dir: Path | None) -> dict[str, HospitalData]:
    site = spec.site_column
    assert site is not None
    validated = validate_tables(tables, spec, require_site=True,
                                quality_dir=quality_dir / "sites" if quality_dir is not None else None)
    frame = pd.concat([v.frame for v in validated], ignore_index=True)
    reports = [v.report for v in validated]
    hospitals = {}
    for hospital_id in sorted(frame[site].unique(), key=natural_key):
        rows = frame[frame[site] == hospital_id].drop(columns=[site]).reset_index(drop=True)
        hospitals[hospital_id] = HospitalData(hospital_id, rows, reports)
    return hospitals
