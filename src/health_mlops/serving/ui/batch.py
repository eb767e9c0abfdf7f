"""The Batch tab: a CSV of patients scored with the champion and handed back with their predictions (the risk as a
percentage beside the probability; the first rows shown on the page; invalid rows listed with the file's patient id,
their line and the reason), and the template CSV to fill in."""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import pandas as pd

from health_mlops.data.io import read_table, write_csv
from health_mlops.data.preprocess import serving_matrix
from health_mlops.data.validate import validate_table
from health_mlops.errors import DataError
from health_mlops.serving.predictor import NoChampion
from health_mlops.serving.ui.shared import DashboardState


INVALID_ROW_COLUMNS = ["line", "reason"]
# What a batch adds to the rows it scores: the probability for programs, the risk in percent for people.
OUTPUT_COLUMNS = ("prediction", "risk_percent", "class", "model_version", "outside_training_range")
PREVIEW_ROWS = 20  # the results' first rows, shown on the page


def id_column(columns: list[str]) -> str | None:
    """The column of the file's own that names its patients (patient_id, id, mrn, ...), if it has one."""
    return next((c for c in columns if c.strip().lower() in ("id", "mrn", "patient") or
                 c.strip().lower().endswith(("_id", " id"))), None)
RESULTS_KEPT_S = 3600.0  # a batch's results file, as long as Gradio keeps an upload


class BatchTab(DashboardState):
    """The Batch tab's callbacks: scored in-process with the champion, counted as endpoint "ui"."""

    def batch(self, path: str | None) -> tuple[str, str | None, pd.DataFrame, pd.DataFrame]:
        empty, none_yet = pd.DataFrame(columns=INVALID_ROW_COLUMNS), pd.DataFrame()
        if not path:
            return "Upload a CSV file with one column per feature (the template lists them).", None, empty, none_yet
        try:
            raw = read_table(Path(path))
            validated = validate_table(raw, self.spec, require_target=False)
        except DataError as error:
            self.predictor.count("ui", "invalid")
            return f"### The file cannot be used\n{error}", None, empty, none_yet
        report = validated.report
        patient = id_column(list(report.ignored_columns))
        invalid = validated.quarantined_rows[["line", "reason"]]
        if patient is not None:  # named as the file names them, beside the line
            ids = raw.rows[patient].set_axis(raw.lines).reindex(invalid["line"])  # a malformed line may have none
            invalid.insert(0, patient, ids.fillna("").to_numpy())
        summary = f"{report.rows_read} rows read: **{report.rows_valid} scored**, **{report.rows_quarantined} invalid**"
        if report.rows_quarantined:
            summary += " (listed below with their line in the file and the reason; they are not in the output)"
            self.predictor.count_invalid_rows("ui", report.rows_quarantined)
        if validated.frame.empty:
            self.predictor.count("ui", "invalid")
            return f"### Nothing to score\n{summary}", None, invalid, none_yet
        matrix = serving_matrix(validated.frame, self.spec)
        try:
            model, predictions = self.predictor.predict("ui", matrix, time.perf_counter())
        except NoChampion as error:
            return f"### No model yet\n{error}", None, invalid, none_yet
        scored = validated.frame.copy()
        scored.insert(0, "line", validated.lines)
        # Columns not in the spec (a patient id, a label, ...) come back beside their rows, so results join back.
        extra = [c for c in raw.header if c in report.ignored_columns]
        if extra:
            carried = raw.rows[extra].set_axis(raw.lines).loc[validated.lines].reset_index(drop=True)
            for k, column in enumerate(extra):
                name = f"{column} (input)" if column in ("line", *OUTPUT_COLUMNS) else column
                scored.insert(1 + k, name, carried[column].to_numpy())
        scored["prediction"] = predictions
        if self.spec.task == "binary":
            scored["risk_percent"] = (100 * predictions.astype(np.float64)).round(1)  # 0.4, not float32's 0.40000001
        if self.spec.task == "binary" and model.threshold is not None:
            scored["class"] = (predictions >= model.threshold).astype(int)
        scored["model_version"] = model.version
        scored["outside_training_range"] = ["; ".join(self._beyond(flag) for flag in flags)
                                            for flags in model.outside_training_range(matrix)]
        out = self._result_folder() / f"{Path(path).stem}-predictions.csv"
        write_csv(scored, out)
        shown = [c for c in (patient or "line", "risk_percent" if "risk_percent" in scored else "prediction", "class",
                             "outside_training_range") if c in scored]
        preview = scored[shown].head(PREVIEW_ROWS).rename(columns={"risk_percent": "risk (%)", "class": "flagged"})
        if "flagged" in preview:
            preview["flagged"] = preview["flagged"].map({1: "yes", 0: ""})
        return (f"### Scored with model v{model.version}\n{summary}; the first {len(preview)} below",
                str(out), invalid, preview)

    def _result_folder(self) -> Path:
        """A new folder for one batch's results, its name unguessable: Gradio's file route serves the results folder
        to whoever names a file in it. Results older than an hour (Gradio's own sweep of uploads) are removed."""
        for old in self._scratch.iterdir():
            with suppress(OSError):
                if old.is_dir() and time.time() - old.stat().st_mtime > RESULTS_KEPT_S:
                    shutil.rmtree(old)
        folder = self._scratch / secrets.token_hex(16)
        folder.mkdir(mode=0o700)
        return folder

    def template(self) -> Path:
        """A CSV to fill in: a `patient_id` column (carried through to the predictions), then one column per
        feature, with one example row of the training population's typical values. Written once per model: every
        page load asks for it."""
        model = self.predictor.current
        path = self._scratch / f"{self.spec.name}-template-v{model.version if model else 0}.csv"
        if path.is_file():
            return path
        typical = model.typical if model else None
        example: dict[str, object] = {"patient_id": "example-1"}
        for j, feature in enumerate(self.spec.features):
            if feature.type == "numeric":
                value = typical[j] if typical else ((feature.min or 0.0) + (feature.max or 0.0)) / 2
                example[feature.name] = round(value, feature.display_decimals)
            else:
                categories = feature.categories or ("",)
                example[feature.name] = categories[int(typical[j])] if typical else categories[0]
        written = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}")  # whole, or not there, to a reader
        write_csv(pd.DataFrame([example]), written)
        written.replace(path)
        return path
