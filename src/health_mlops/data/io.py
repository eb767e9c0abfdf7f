"""Reading hospital data files (CSV or Parquet) into raw tables, and finding the hospitals under a folder.

Reading never interprets values: every cell stays as read, so validation can say exactly what was wrong
with which line. A file that cannot be read at all raises `DataError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from health_mlops.errors import DataError

DATA_SUFFIXES = (".csv", ".parquet")


@dataclass
class MalformedLine:
    """A CSV line whose number of fields differs from the header's."""

    line: int
    fields: list[str]


@dataclass
class RawTable:
    """A file's rows as read: `rows` holds every cell untouched, `lines` each row's line in the file."""

    path: Path
    header: list[str]
    rows: pd.DataFrame
    lines: np.ndarray
    malformed: list[MalformedLine] = field(default_factory=list)

    @property
    def rows_read(self) -> int:
        return len(self.rows) + len(self.malformed)


def read_table(path: Path) -> RawTable:
    """Read one CSV or Parquet file; line numbers count the CSV header as line 1 (Parquet: row 1 is the first)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path)
    raise DataError(path, f"unsupported file type {path.suffix!r} (expected {' or '.join(DATA_SUFFIXES)})")


def _read_csv(path: Path) -> RawTable:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    if not raw.strip():
        raise DataError(path, "empty file (no header, no rows)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            path, f"wrong encoding: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-export the file as UTF-8") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records: list[list[str]] = []
    lines: list[int] = []
    malformed: list[MalformedLine] = []
    try:
        for fields in reader:
            if not fields or all(not f.strip() for f in fields):
                continue  # blank lines are not rows
            if header is None:
                header = [f.strip() for f in fields]
                continue
            if len(fields) != len(header):
                malformed.append(MalformedLine(reader.line_num, fields))
                continue
            records.append(fields)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(path, f"not a readable CSV file (line {reader.line_num}: {exc})") from exc
    if header is None:
        raise DataError(path, "empty file (no header, no rows)")
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DataError(path, f"columns named twice in the header: {', '.join(duplicated)}")
    if not records and not malformed:
        raise DataError(path, "empty file (a header but no data rows)")
    rows = pd.DataFrame(records, columns=header, dtype=object)
    return RawTable(path, header, rows, np.asarray(lines, dtype=np.int64), malformed)


def _read_parquet(path: Path) -> RawTable:
    try:
        rows = pq.read_table(path).to_pandas()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise DataError(path, f"cannot read as Parquet: {exc}") from exc
    if rows.empty:
        raise DataError(path, "empty file (no data rows)")
    header = [str(c) for c in rows.columns]
    rows.columns = header
    return RawTable(path, header, rows.astype(object), np.arange(1, len(rows) + 1, dtype=np.int64))


def data_files(folder: Path) -> list[Path]:
    """The CSV and Parquet files directly inside a folder, in a stable order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)


def natural_key(name: str) -> list[object]:
    """Sort key that puts hospital-2 before hospital-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def hospital_folders(root: Path) -> list[Path]:
    """Sub-folders of `root` that hold data files: one per hospital, in natural order."""
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and data_files(p)]
    return sorted(folders, key=lambda p: natural_key(p.name))


# A cell a spreadsheet would take for a formula (OWASP's CSV injection rule): `=HYPERLINK(...)` in a patient id
# would run in whoever opens the results.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with every text cell that begins like a formula prefixed with `'`, which spreadsheets show as text.
    Numeric columns are left alone: a negative number is a number, not a formula."""
    safe = frame.copy()
    for column in safe.columns:
        if not (pd.api.types.is_numeric_dtype(safe[column]) or pd.api.types.is_bool_dtype(safe[column])):
            safe[column] = safe[column].map(
                lambda cell: f"'{cell}" if isinstance(cell, str) and cell.startswith(FORMULA_STARTS) else cell)
    return safe


def write_csv(frame: pd.DataFrame, destination: Path | IO[str]) -> None:
    """Every CSV we write goes through here: without its index, its formula-like text cells neutralised, with
    RFC 4180's CRLF line ends (so that a cell holding a line break is quoted, not a new row to the reader)."""
    neutralise_formulas(frame).to_csv(destination, index=False, lineterminator="\r\n")
