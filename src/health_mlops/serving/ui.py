"""The dashboard: Gradio tabs over the same predictor, registry and federation as the REST API.

Predict and Batch score in-process with the champion (counted as endpoint "ui" in the serving metrics);
Training and Hospitals follow the federation live; Models shows the champion's federated model report and promotes
and rolls back with the admin token;
Monitoring reads the serving metrics and the champion's drift scores.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Literal

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from pydantic import ValidationError

from health_mlops.data.io import read_table, write_csv
from health_mlops.data.preprocess import serving_matrix
from health_mlops.data.validate import validate_table
from health_mlops.errors import DataError, RegistryError
from health_mlops.monitoring import histogram_quantile
from health_mlops.registry import ModelVersion, Registry
from health_mlops.access import Role, allows
from health_mlops.serving.access_edge import FunctionRule
from health_mlops.serving.drift import MIN_ROWS, SIGNIFICANT_PSI
from health_mlops.serving.predictor import NoChampion, Predictor
from health_mlops.serving.requests import InvalidRequest
from health_mlops.serving.sources import DashboardSources, FederationState, TrainingRun
from health_mlops.spec import DatasetSpec


# A contribution that moves a risk by less than half a percentage point (a regression prediction by less than 1 %
# of the target's range) is within the rounding of what a clinician reads: listed as negligible, drawn in grey, and
# the plot's axis never shrinks below a few times this, so small effects do not look large.
NEGLIGIBLE_RISK = 0.005
NEGLIGIBLE_SHARE_OF_RANGE = 0.01
INVALID_ROW_COLUMNS = ["line", "reason"]
# What a batch adds to the rows it scores.
OUTPUT_COLUMNS = ("prediction", "class", "model_version", "outside_training_range")
LATEST_RUN = "the latest run"
FEDERATED_RISK = "the federated model"  # the Predict tab's risk without a hospital's recalibration
RESULTS_KEPT_S = 3600.0  # a batch's results file, as long as Gradio keeps an upload
# The Hospitals table's ten columns (see `Dashboard.hospitals`): the third, a hospital's replicas, links each to its
# node's status page.
HOSPITAL_COLUMN_TYPES: list[Literal["str", "markdown"]] = ["str", "str", "markdown", "str", "str", "str", "str", "str",
                                                          "str", "str"]


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _field_errors(error: ValidationError) -> str:
    return "\n".join(f"- **{'.'.join(str(p) for p in e['loc'])}**: {e['msg']}" for e in error.errors())


class Dashboard:
    """The callbacks behind the tabs; each returns what its outputs show and never raises at the user."""

    def __init__(self, spec: DatasetSpec, predictor: Predictor, registry: Registry, sources: DashboardSources,
                 role_of: Callable[[str], Role | None], *, scratch: Path, links: dict[str, str] | None = None,
                 node_links: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.links = links or {}  # the tools beside the dashboard (MLflow's UI, Prometheus), where configured
        self.node_links = node_links or {}  # node id -> its status page, where configured
        self.predictor = predictor
        self.registry = registry
        self.sources = sources
        self.role_of = role_of  # a logged-in user's role, as the accounts file says now
        self.metric = spec.primary_metric
        self._last_count: tuple[float, float] | None = None  # (time, predictions) at the last monitoring view
        self._scratch = scratch  # batch results: patient rows, in the dashboard's private folder
        scratch.mkdir(mode=0o700, exist_ok=True)
        self._reports: dict[int, dict[str, Any] | None] = {}

    # --- Who sees what ----------------------------------------------------------------------------------

    def view(self, request: gr.Request) -> tuple[Any, ...]:
        """What the user's role shows: who is logged in; for an operator the Training, Models, Hospitals and
        Monitoring tabs and their refreshes; for an admin the promote and roll back actions. (Hiding is for the
        user's sake: the edge refuses another role's functions whatever the page shows.)"""
        user = request.username or ""
        role = self.role_of(user)
        operator = role is not None and allows(role, "operator")
        admin = role is not None and allows(role, "admin")
        who = f"Logged in as **{user}** ({role or 'no role'})"
        model = self.predictor.watcher.current
        sites = sorted(model.sites) if model is not None else []
        return (who, *(gr.Tab(visible=operator) for _ in range(4)), gr.Row(visible=admin),
                gr.Timer(active=operator), gr.Timer(active=operator),
                gr.Dropdown(choices=[FEDERATED_RISK, *sites], value=FEDERATED_RISK, visible=bool(sites)))

    @staticmethod
    def opened() -> gr.Timer:
        """Stops the one-shot timer that loads an operator's tabs when the page opens."""
        return gr.Timer(active=False)

    # --- Predict ----------------------------------------------------------------------------------------

    def predict(self, *values: Any) -> tuple[str, go.Figure | None]:
        """The form's features, then the hospital whose recalibration to answer with (or `FEDERATED_RISK`)."""
        *entered, site = values
        row = dict(zip((f.name for f in self.spec.features), entered, strict=True))
        try:
            validated = self.predictor.encoder.row_model.model_validate(row)
        except ValidationError as error:
            self.predictor.count_invalid("ui", 1)
            return "### Not scored: fix these fields\n" + _field_errors(error), None
        matrix = self.predictor.encoder.matrix_of([validated])
        hospital = None if site in (None, "", FEDERATED_RISK) else str(site)
        try:
            model, prediction = self.predictor.predict("ui", matrix, time.perf_counter(), hospital)
        except NoChampion as error:
            return f"### No model yet\n{error}", None
        except InvalidRequest:  # a value the page never offered: it is not echoed back
            self.predictor.count_invalid("ui", 1)
            current = self.predictor.watcher.current
            known = ", ".join(sorted(current.sites)) if current is not None else ""
            return f"### Not scored\nThe model has no recalibration by that hospital (it has: {known or 'none'}).", None
        found = self.predictor.explain(model, matrix)
        target = self.spec.target.display_label
        risk = float(prediction[0])
        if self.spec.task == "binary":
            headline = f"### Risk of {target}: **{_percent(risk)}**"
            threshold, whose = model.threshold_for(hospital), "the model's" if hospital is None else f"{hospital}'s"
            if hospital is not None:
                headline += (f"\n\nAs **{hospital}** recalibrated the federated model on its own patients "
                             f"(federated risk {_percent(float(model.predict(matrix)[0]))}).")
            if threshold is not None:
                flagged = risk >= threshold
                headline += (f"\n\n{'**Flagged**: at or above' if flagged else 'Not flagged: below'} {whose} "
                             f"decision threshold of {_percent(threshold)}.\n")
            unit, scale, negligible = "percentage points", 100.0, NEGLIGIBLE_RISK
        else:
            headline = f"### Predicted {target}: **{risk:.2f}**"
            span = (self.spec.target.max or 0.0) - (self.spec.target.min or 0.0)
            unit, scale, negligible = self.spec.target.unit or "", 1.0, NEGLIGIBLE_SHARE_OF_RANGE * span
        lines = [headline]
        if self.spec.task == "binary":
            lines.append("\n\n".join(self._risk_context(model.version, risk)) + "\n")
        features = {f.name: f for f in self.spec.features}
        labels = {name: f.display_label for name, f in features.items()}

        def in_words(name: str, value: float | str) -> str:
            feature = features[name]
            if feature.is_yes_no:
                return {"0": "No", "1": "Yes"}.get(str(value), str(value))
            if isinstance(value, float) and not math.isnan(value):
                return f"{value:.{feature.display_decimals}f}"
            return _shown(value)

        lines += [f"**Caution**: {self._beyond(flag)}; treat this risk with caution.\n"
                  for flag in model.outside_training_range(matrix)[0]]
        lines.append(f"model v{model.version}. Main contributing features: how much each feature's value moves the "
                     "prediction, against the training population's typical value.")
        for c in found:
            change = (f"{scale * c['contribution']:+.2f} {unit}" if abs(c["contribution"]) >= negligible else
                      f"negligible (under {scale * negligible:g} {unit})")
            lines.append(f"- **{labels.get(c['feature'], c['feature'])}** = {in_words(c['feature'], c['value'])} "
                         f"(typical {in_words(c['feature'], c['typical'])}): {change}")
        shown = list(reversed(found))
        figure = go.Figure(go.Bar(x=[scale * c["contribution"] for c in shown],
                                  y=[labels.get(c["feature"], c["feature"]) for c in shown], orientation="h",
                                  marker_color=["#b0b0b0" if abs(c["contribution"]) < negligible else
                                                "#c0392b" if c["contribution"] > 0 else "#2e86c1" for c in shown]))
        reach = 1.1 * scale * max([abs(c["contribution"]) for c in found] + [4 * negligible])
        figure.update_layout(title=f"What moved this prediction ({unit}; grey: negligible)", height=300,
                             xaxis_range=[-reach, reach], margin={"l": 10, "r": 10, "t": 40, "b": 10})
        return "\n".join(lines), figure

    def _risk_context(self, version: int, risk: float) -> list[str]:
        """Where a risk sits, from the model's report: the training population's event rate, the share of test
        patients predicted lower, and how often patients predicted near it had the event."""
        try:
            report = self._report(version)
        except Exception:  # noqa: BLE001 - the registry may be away: the risk stands without its context
            report = None
        if report is None:
            return [f"_No model report for v{version}: the population context is not available._"]
        lines = []
        data = report.get("data") or {}
        rows = sum(d.get("rows") or 0 for d in data.values())
        events = sum(d.get("events") or 0 for d in data.values())
        if rows:
            lines.append(f"In the training population, **{_percent(events / rows)}** had "
                         f"{self.spec.target.display_label} ({events} of {rows} patient-days at {len(data)} "
                         "hospitals).")
        bins = (report.get("all_test_rows") or {}).get("reliability") or []
        tested = sum(b["rows"] for b in bins)
        if tested:
            lower = sum(b["rows"] for b in bins if b["high"] <= risk)
            lines.append(f"**{_percent(lower / tested)}** of the {tested} test patients were predicted in a lower "
                         "risk band.")
            near = next((b for b in bins if b["low"] <= risk < b["high"] or risk == b["high"] == 1.0), None)
            if near is None:
                lines.append("No test patient was predicted near this risk: its calibration is not measured.")
            else:
                lines.append(f"Calibration near this risk: of the {near['rows']} test patients predicted "
                             f"{_percent(near['low'])} to {_percent(near['high'])}, **{_percent(near['observed'])}** "
                             f"had the event (predicted {_percent(near['predicted'])} on average).")
        return lines

    def _beyond(self, flag: dict[str, Any]) -> str:
        """An input beyond what the model was trained on, in words."""
        feature = next(f for f in self.spec.features if f.name == flag["feature"])
        unit = f" {feature.unit}" if feature.unit else ""
        low, high = flag["seen"]
        side = "below" if flag["value"] < low else "above"
        edge = low if side == "below" else high
        return (f"{feature.display_label} {flag['value']:.{feature.display_decimals}f}{unit} is {side} what the model "
                f"was trained on ({low:g} to {high:g}{unit}); it is scored as {edge:g}{unit}")

    # --- Batch --------------------------------------------------------------------------------------------

    def batch(self, path: str | None) -> tuple[str, str | None, pd.DataFrame]:
        empty = pd.DataFrame(columns=INVALID_ROW_COLUMNS)
        if not path:
            return "Upload a CSV file with one column per feature (the template lists them).", None, empty
        try:
            raw = read_table(Path(path))
            validated = validate_table(raw, self.spec, require_target=False)
        except DataError as error:
            self.predictor.count("ui", "invalid")
            return f"### The file cannot be used\n{error}", None, empty
        invalid = validated.quarantined_rows[["line", "reason"]]
        report = validated.report
        summary = f"{report.rows_read} rows read: **{report.rows_valid} scored**, **{report.rows_quarantined} invalid**"
        if report.rows_quarantined:
            summary += " (listed below with their line in the file and the reason; they are not in the output)"
            self.predictor.count_invalid_rows("ui", report.rows_quarantined)
        if validated.frame.empty:
            self.predictor.count("ui", "invalid")
            return f"### Nothing to score\n{summary}", None, invalid
        matrix = serving_matrix(validated.frame, self.spec)
        try:
            model, predictions = self.predictor.predict("ui", matrix, time.perf_counter())
        except NoChampion as error:
            return f"### No model yet\n{error}", None, invalid
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
        if self.spec.task == "binary" and model.threshold is not None:
            scored["class"] = (predictions >= model.threshold).astype(int)
        scored["model_version"] = model.version
        scored["outside_training_range"] = ["; ".join(self._beyond(flag) for flag in flags)
                                            for flags in model.outside_training_range(matrix)]
        out = self._result_folder() / f"{Path(path).stem}-predictions.csv"
        write_csv(scored, out)
        return f"### Scored with model v{model.version}\n{summary}", str(out), invalid

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
        model = self.predictor.watcher.current
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

    # --- Training and hospitals ------------------------------------------------------------------------

    def federation(self, selected: str | None = None) -> tuple[Any, ...]:
        """The Training and Hospitals tabs, from one look at the federation; Training shows run `selected` (the
        latest run if none is picked or it is gone)."""
        state = self.sources.federation()
        return (*self.training(state, selected), *self.hospitals(state))

    def training(self, state: FederationState, selected: str | None = None) -> tuple[Any, ...]:
        """The run picker, a note, and the chosen run's plots: the global metric, each hospital's metric, each
        hospital's training loss, and which hospitals counted in each round."""
        ids = [run.id for run in state.runs]
        chosen = selected if selected in ids else LATEST_RUN  # the latest follows new runs as they start
        run = next((r for r in state.runs if r.id == chosen), state.runs[-1] if state.runs else None)
        picker = gr.update(choices=[LATEST_RUN, *reversed(ids)], value=chosen)
        metric = self.metric.upper() if self.metric == "auc" else self.metric
        name = run.id if run else "no run yet"
        overall = _curves({"global model": run.global_metric} if run else {},
                          f"{name}: global model {metric} by round (federated evaluation)", metric)
        per_hospital = _curves(run.hospital_metric if run else {}, f"{metric} at each hospital", metric)
        losses = _curves(run.hospital_loss if run else {}, "local training loss at each hospital", "mean loss")
        participation = _participation(run)
        note = _source_note(state) + ("" if state.runs else "\n\nNo training run yet: `health-mlops demo` starts one.")
        if run is not None:
            note += (f"\n\nShowing **{run.id}** ({run.status}). A round's metric scores the model *entering* that "
                     "round (each hospital on its own test rows); the last evaluation round scores the final model. "
                     "The loss is each hospital's local training during the round.")
        if run is not None and run.privacy is not None:
            privacy = run.privacy
            note += (f"\n\n{run.id} trains with differential privacy (DP-SGD): ε spent so far "
                     f"**{privacy['epsilon']:.2f}** of {privacy['budget_epsilon']:g} at δ = {privacy['delta']:g} "
                     "(the most any hospital has spent).")
        if run is not None and run.secure_aggregation:
            note += (f"\n\n{run.id} is **securely aggregated**: the aggregator saw each round's sum of the hospitals' "
                     "updates only, never one hospital's (masked; unmasked with the shares of a majority).")
        return picker, note, overall, per_hospital, losses, participation

    def hospitals(self, state: FederationState) -> tuple[str, pd.DataFrame]:
        now = time.time()
        table = pd.DataFrame([{"hospital": h.hospital, "status": h.status, "replicas": self._replicas(h.replicas),
                               "last heartbeat": None if h.last_heartbeat is None else
                               f"{max(now - h.last_heartbeat, 0):.0f} s ago",
                               "rows trained on": h.rows,
                               "rows quarantined": h.rows_quarantined, "last round": h.last_round,
                               self.metric: None if h.metric is None else round(h.metric, 4),
                               "small cells suppressed": _suppressed(h.suppressed),
                               "privacy ε spent": None if h.epsilon is None else round(h.epsilon, 3)}
                              for h in state.hospitals],
                             columns=["hospital", "status", "replicas", "last heartbeat", "rows trained on",
                                      "rows quarantined", "last round",
                                      self.metric, "small cells suppressed", "privacy ε spent"])
        return _source_note(state), table

    def _replicas(self, replicas: list[str]) -> str:
        """A hospital's replicas, each a link to its status page where one is configured (Markdown)."""
        return ", ".join(f"[{r}]({self.node_links[r]})" if r in self.node_links else r for r in replicas)

    # --- Models ------------------------------------------------------------------------------------------

    def _versions(self) -> list[ModelVersion]:
        """The registered versions, newest first (none while the registry is away: the page still shows)."""
        try:
            return list(reversed(self.registry.versions()))
        except Exception:  # noqa: BLE001 - the registry may be away; show nothing rather than fail the page
            return []

    def models(self) -> pd.DataFrame:
        return _versions_table(self._versions())

    def registered(self) -> tuple[pd.DataFrame, dict[str, Any], dict[str, Any], dict[str, Any]]:
        """The Models tab as a page loads, from one look at the registry: the versions, and the promote and compare
        pickers (the champion compared with the newest other version)."""
        versions = self._versions()
        choices = [(f"v{v.version}" + (f" ({', '.join(v.aliases)})" if v.aliases else ""), v.version) for v in versions]
        champion = next((v.version for v in versions if "champion" in v.aliases), None)
        other = next((v.version for v in versions if v.version != champion), None)
        return (_versions_table(versions), gr.update(choices=choices, value=None),
                gr.update(choices=choices, value=champion), gr.update(choices=choices, value=other))

    def champion_report(self) -> tuple[str, pd.DataFrame, go.Figure | None, go.Figure | None]:
        """The champion's federated model report: a summary, the per-hospital table, ROC and calibration plots."""
        empty = pd.DataFrame(columns=_REPORT_COLUMNS)
        try:
            champion = self.registry.champion()
            report = None if champion is None else self._report(champion.version)
        except Exception:  # noqa: BLE001 - the registry may be away; say so rather than fail the page
            return "The registry cannot be read just now.", empty, None, None
        if champion is None:
            return "No champion yet: a model report appears when the first model is registered.", empty, None, None
        if report is None:
            return f"Champion v{champion.version} was registered before model reports existed.", empty, None, None
        return (_report_summary(champion.version, report), _report_table(report), _roc_figure(report),
                _calibration_figure(report))

    def _report(self, version: int) -> dict[str, Any] | None:
        if version not in self._reports:  # a version's report never changes: read it once
            self._reports[version] = self.registry.load_report(version)
        return self._reports[version]

    def compare(self, first: int | None, second: int | None) -> tuple[str, pd.DataFrame]:
        """Two versions' federated model reports side by side: each hospital's metrics, and the mean."""
        if first is None or second is None:
            return "Pick two versions to compare.", pd.DataFrame(columns=["hospital"])
        try:
            reports = {version: self._report(version) for version in (first, second)}
        except Exception:  # noqa: BLE001 - the registry may be away
            return "The registry cannot be read just now.", pd.DataFrame(columns=["hospital"])
        missing = [f"v{v}" for v, r in reports.items() if r is None]
        if missing:
            return (f"{', '.join(missing)}: registered before model reports existed; nothing to compare.",
                    pd.DataFrame(columns=["hospital"]))
        return _comparison(first, reports[first], second, reports[second])  # type: ignore[arg-type]

    # Promote and roll back run only for admins: the dashboard's edge checks the role before either is called.

    def promote(self, version: int | None, request: gr.Request) -> tuple[str, pd.DataFrame]:
        if version is None:
            return "**Pick the version to promote.**", self.models()
        return self._admin_action(lambda actor: self.registry.promote(int(version), actor=actor), "promoted",
                                  request)

    def rollback(self, request: gr.Request) -> tuple[str, pd.DataFrame]:
        return self._admin_action(lambda actor: self.registry.rollback(actor=actor), "rolled back to", request)

    def _admin_action(self, action: Callable[[str], Any], verb: str,
                      request: gr.Request) -> tuple[str, pd.DataFrame]:
        try:
            version = action(f"{request.username} (dashboard)")
        except RegistryError as error:
            return f"**Refused:** {error}", self.models()
        return (f"**Done:** {verb} v{version.version}; it is served within seconds. The audit log has the entry.",
                self.models())

    # --- Monitoring --------------------------------------------------------------------------------------

    def monitoring(self) -> tuple[str, pd.DataFrame]:
        metrics = self.predictor.metrics
        counts = {(s.labels["endpoint"], s.labels["outcome"]): s.value
                  for s in next(iter(metrics.predictions.collect())).samples if s.name.endswith("_total")}
        served = sum(v for (_, outcome), v in counts.items() if outcome == "ok")
        now = time.monotonic()
        rate = None
        if self._last_count is not None and now > self._last_count[0]:
            rate = (served - self._last_count[1]) / (now - self._last_count[0])
        self._last_count = (now, served)
        invalid_rows = {s.labels["endpoint"]: s.value for s in next(iter(metrics.invalid_rows.collect())).samples
                        if s.name.endswith("_total")}
        lines = ["Requests by outcome: *invalid* is the client's input (422), *no model* and *error* the service's.",
                 "", "| endpoint | ok | invalid (rows) | no model | error | p50 latency | p99 latency |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for endpoint in ("predict", "batch", "ui"):
            p50, p99 = (histogram_quantile(metrics.latency, q, endpoint=endpoint) for q in (0.5, 0.99))
            ok, invalid, no_model, error = (counts.get((endpoint, outcome), 0)
                                            for outcome in ("ok", "invalid", "no_model", "error"))
            lines.append(f"| {endpoint} | {ok:.0f} | {invalid:.0f} ({invalid_rows.get(endpoint, 0):.0f}) | "
                         f"{no_model:.0f} | {error:.0f} | {_ms(p50)} | {_ms(p99)} |")
        model = self.predictor.watcher.current
        header = (f"Serving **model v{model.version}**." if model else "No champion served yet.") + (
            f" Throughput since the last refresh: **{rate:.1f} requests/s**." if rate is not None else "")
        drift = pd.DataFrame(columns=["feature", "PSI", "shifted"])
        if model is not None:
            scores = model.drift.scores()
            drift = pd.DataFrame([{"feature": name, "PSI": round(score, 3),
                                   "shifted": "yes" if score > SIGNIFICANT_PSI else ""}
                                  for name, score in sorted(scores.items(), key=lambda kv: -kv[1])],
                                 columns=drift.columns)
            header += (f" Drift over the last {model.drift.rows_seen} rows scored: population stability index against "
                       f"the training population (below 0.1 stable; above {SIGNIFICANT_PSI} shifted)."
                       if scores else
                       f" Drift is shown from {MIN_ROWS} scored rows on ({model.drift.rows_seen} so far).")
        return header + "\n\n" + "\n".join(lines), drift


_REPORT_METRICS = (("Brier", "brier"), ("calibration slope", "calibration_slope"),
                   ("calibration intercept", "calibration_intercept"), ("sensitivity", "sensitivity"),
                   ("specificity", "specificity"), ("PPV", "ppv"), ("NPV", "npv"),
                   ("balanced accuracy", "balanced_accuracy"))
_REPORT_COLUMNS = ["hospital", "AUC (95% CI)", *(title for title, _ in _REPORT_METRICS), "test rows",
                   "training rows", "events", "quarantined", "not measured"]


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _auc_cell(metrics: dict[str, Any]) -> str:
    auc, low, high = metrics.get("auc"), metrics.get("auc_ci_low"), metrics.get("auc_ci_high")
    if auc is None:
        return "–"
    return f"{auc:.3f} ({low:.2f}–{high:.2f})" if low is not None and high is not None else f"{auc:.3f}"


def _report_table(report: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for hospital, metrics in report["per_hospital"].items():
        data = report.get("data", {}).get(hospital, {})
        missing = ", ".join(f"{name} {n}" for name, n in (data.get("missing_values") or {}).items() if n) or "–"
        rows.append([hospital, _auc_cell(metrics), *(_number(metrics.get(key)) for _, key in _REPORT_METRICS),
                     report.get("test_rows", {}).get(hospital, "–"), data.get("rows", "–"),
                     data.get("events", "–"), data.get("rows_quarantined", "–"), missing])
    mean = report["mean_over_hospitals"]
    rows.append(["mean over hospitals", _auc_cell(mean), *(_number(mean.get(key)) for _, key in _REPORT_METRICS),
                 *["" for _ in range(5)]])
    pooled = report.get("all_test_rows")
    if pooled:
        auc = "–" if pooled.get("auc") is None else f"{pooled['auc']:.3f} (± {pooled['auc_error_bound']:.3f})"
        rows.append(["all test rows (from counts)", auc,
                     *(_number(pooled.get(key)) for _, key in _REPORT_METRICS), *["" for _ in range(5)]])
    return pd.DataFrame(rows, columns=_REPORT_COLUMNS)


def _versions_table(versions: list[ModelVersion]) -> pd.DataFrame:
    """The registered versions, in the order given, as the Models tab lists them."""
    return pd.DataFrame([{"version": v.version, "aliases": ", ".join(v.aliases), "metric": v.metric_name,
                          "value": round(v.metric, 4), "privacy": v.privacy_text(),
                          "federation run": v.federation_run,
                          "registered": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))}
                         for v in versions],
                        columns=["version", "aliases", "metric", "value", "privacy", "federation run",
                                 "registered"])


_COMPARED = (("AUC", "auc"), ("Brier", "brier"), ("calibration slope", "calibration_slope"),
             ("sensitivity", "sensitivity"), ("specificity", "specificity"))


def _comparison(first: int, a: dict[str, Any], second: int, b: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    """Per hospital (and the mean over hospitals), each metric of v`first`, of v`second`, and the change."""
    rows = []
    hospitals = list(dict.fromkeys([*a["per_hospital"], *b["per_hospital"]]))
    for name, (metrics_a, metrics_b) in [*((h, (a["per_hospital"].get(h, {}), b["per_hospital"].get(h, {})))
                                           for h in hospitals),
                                         ("mean over hospitals", (a["mean_over_hospitals"], b["mean_over_hospitals"]))]:
        row: dict[str, str] = {"hospital": name}
        for title, key in _COMPARED:
            x, y = metrics_a.get(key), metrics_b.get(key)
            row[f"{title} v{first}"], row[f"{title} v{second}"] = _number(x), _number(y)
            row[f"{title} change"] = "–" if x is None or y is None else f"{y - x:+.3f}"
        rows.append(row)
    summary = (f"### v{first} against v{second}\nEach hospital's metrics of the two versions on its own test rows "
               f"(from their federated model reports), and the change from v{first} to v{second}.")
    return summary, pd.DataFrame(rows)


def _report_summary(version: int, report: dict[str, Any]) -> str:
    config = report.get("config", {})
    privacy = report.get("privacy")
    lines = [f"### Champion v{version}: federated model report",
             f"Federation run `{report['federation_run']}`: {config.get('strategy', {}).get('name', '?')}, "
             f"{config.get('rounds', '?')} rounds, {len(report['per_hospital'])} hospitals; "
             + ("differential privacy ε = {:.2f}, δ = {:g}".format(privacy["epsilon"], privacy["delta"])
                if privacy else "no differential privacy")
             + ("; secure aggregation (the aggregator saw only sums of the hospitals' updates)."
                if config.get("secure_aggregation") else ".")]
    if report.get("threshold") is not None:
        lines.append(f"Decisions (sensitivity to balanced accuracy) flag a risk at or above "
                     f"**{100 * report['threshold']:.1f} %**. Each hospital computed its metrics on its own test rows; "
                     "the AUC's 95% interval is a bootstrap done there. \"All test rows\" is built from counts only; "
                     "its AUC is exact to within the ± shown.")
    for hospital, why in (report.get("excluded") or {}).items():
        lines.append(f"- {hospital}: left out ({why})")
    for hospital, reasons in (report.get("undefined") or {}).items():
        if "auc" in reasons:
            lines.append(f"- {hospital}: AUC undefined ({reasons['auc']})")
    return "\n\n".join(lines)


def _roc_figure(report: dict[str, Any]) -> go.Figure | None:
    curves = report.get("curves")
    if not curves:
        return None
    figure = go.Figure()
    figure.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "grey"}, name="chance")
    for hospital, curve in curves.items():
        auc = report["per_hospital"][hospital].get("auc")
        figure.add_scatter(x=curve["roc"]["fpr"], y=curve["roc"]["tpr"], mode="lines", line_shape="hv",
                           name=f"{hospital} (AUC {_number(auc)})")
    figure.update_layout(title="ROC curve per hospital (final model, each on its own test rows)",
                         xaxis_title="false positive rate (1 − specificity)", yaxis_title="true positive rate "
                         "(sensitivity)", xaxis_range=[0, 1], yaxis_range=[0, 1.02], height=420)
    return figure


def _calibration_figure(report: dict[str, Any]) -> go.Figure | None:
    curves = report.get("curves")
    if not curves:
        return None
    figure = go.Figure()
    top = max([b["predicted"] for c in curves.values() for b in c["reliability"]]
              + [b["observed"] for c in curves.values() for b in c["reliability"]] + [0.05])
    figure.add_scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dot", "color": "grey"},
                       name="perfectly calibrated")
    for hospital, curve in curves.items():
        bins = curve["reliability"]
        figure.add_scatter(x=[b["predicted"] for b in bins], y=[b["observed"] for b in bins], mode="lines+markers",
                           text=[f"{b['rows']} rows" for b in bins], name=hospital)
    figure.update_layout(title="Calibration: observed event rate by predicted risk",
                         xaxis_title="mean predicted risk", yaxis_title="observed event rate",
                         xaxis_range=[0, top * 1.05], yaxis_range=[0, top * 1.05], height=420)
    return figure


def _curves(curves: dict[str, list[tuple[int, float]]], title: str, axis: str) -> go.Figure:
    """One line per curve by round, the value axis fitted to the data (with a margin), whole rounds only."""
    figure = go.Figure()
    values: list[float] = []
    for name, curve in curves.items():
        if curve:
            rounds, ys = zip(*curve, strict=True)
            figure.add_trace(go.Scatter(x=rounds, y=ys, mode="lines+markers", name=name))
            values += ys
    layout: dict[str, Any] = {"title": title, "height": 360, "xaxis": {"title": "round", "dtick": 1},
                              "yaxis_title": axis}
    if values:
        low, high = min(values), max(values)
        margin = max(0.05 * (high - low), 0.005)
        layout["yaxis_range"] = [low - margin, high + margin]
    figure.update_layout(**layout)
    return figure


def _participation(run: TrainingRun | None) -> go.Figure:
    """Which hospitals' results counted in each round (a filled mark), and which enrolled ones did not (a cross)."""
    figure = go.Figure()
    if run is not None and run.participation:
        counted = [(r, h) for r, hospitals in run.participation for h in hospitals]
        missed = [(r, h) for r, hospitals in run.participation for h in run.enrolled if h not in hospitals]
        for points, name, symbol, color in ((counted, "counted", "circle", "#2e86c1"),
                                            (missed, "no result", "x", "#c0392b")):
            if points:
                figure.add_trace(go.Scatter(x=[r for r, _ in points], y=[h for _, h in points], mode="markers",
                                            name=name, marker={"symbol": symbol, "size": 10, "color": color}))
    figure.update_layout(title=f"{run.id if run else 'no run yet'}: hospitals whose results counted, by round "
                               "(round 0 counts rows)", height=300,
                         xaxis={"title": "round", "dtick": 1}, yaxis={"categoryorder": "category descending"})
    return figure


def _suppressed(cells: dict[str, int] | None) -> str | None:
    if cells is None:
        return None
    return f"{cells.get('categories', 0)} categories, {cells.get('histogram_bins', 0)} histogram bins"


def _shown(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return "not measured" if math.isnan(value) else f"{value:.4g}"


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"≤ {1000 * seconds:g} ms"


def _source_note(state: FederationState) -> str:
    return f"Source: {state.source}."


def build_dashboard(dashboard: Dashboard, *, refresh_s: float = 2.0) -> gr.Blocks:
    spec = dashboard.spec
    model = dashboard.predictor.watcher.current
    typical = model.typical if model else None
    # Uploaded files (patient rows) are swept every 10 minutes once an hour old, and all at shutdown.
    with gr.Blocks(title="Health MLOps", delete_cache=(600, 3600)) as blocks:
        gr.Markdown(f"# Health MLOps: {spec.name}\n{spec.description}")
        if spec.intended_use:
            gr.Markdown(f"**Intended use:** {spec.intended_use}", elem_id="intended-use")
        if dashboard.links:
            gr.Markdown("Also: " + " · ".join(f"[{name}]({url})" for name, url in dashboard.links.items()),
                        elem_id="links")
        with gr.Row():
            who = gr.Markdown(elem_id="logged-in")
            # A form, not a link: logging out is a POST (no page elsewhere can log a user out by linking here).
            gr.HTML('<form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form>')
        with gr.Tab("Predict"):
            inputs: list[gr.components.Component] = []
            sources = list(dict.fromkeys(f.source.value for f in spec.features))
            for source in sources:
                gr.Markdown(f"**{source.replace('_', ' ')}**")
                with gr.Row():
                    for j, feature in enumerate(spec.features):
                        if feature.source.value != source:
                            continue
                        label = feature.display_label + (f" ({feature.unit})" if feature.unit else "")
                        help_text = feature.description
                        if feature.type == "numeric":
                            value = round(typical[j], feature.display_decimals) if typical else feature.min
                            inputs.append(gr.Number(label=label, value=value, elem_id=f"input-{feature.name}",
                                                    info=f"{help_text} ({feature.allowed()})", min_width=160))
                        else:
                            categories = list(feature.categories or ())
                            choice = categories[int(typical[j])] if typical else categories[0]
                            choices = [("No", "0"), ("Yes", "1")] if feature.is_yes_no else categories
                            inputs.append(gr.Radio(choices, value=choice, label=label, info=help_text,
                                                   elem_id=f"input-{feature.name}", min_width=160))
            # Shown when the champion carries hospitals' recalibrations (`view` fills it when the page opens).
            site = gr.Dropdown(label="risk as", choices=[FEDERATED_RISK], value=FEDERATED_RISK, visible=False,
                               elem_id="predict-hospital", info="the federated model, or as a hospital recalibrated "
                               "it on its own patients")
            predict_button = gr.Button("Predict", variant="primary", elem_id="predict-button")
            with gr.Row():
                risk = gr.Markdown(elem_id="prediction")
                contributions = gr.Plot(label="main contributing features")
            predict_button.click(dashboard.predict, [*inputs, site], [risk, contributions])
        with gr.Tab("Batch"):
            gr.Markdown("Upload a CSV with one column per feature; download it back with a `prediction` column "
                        "(and `class`, flagged at the model's threshold). Other columns, such as a patient id, come "
                        "back unchanged beside their rows. Invalid rows are listed with their line and reason, never "
                        "dropped silently.")
            gr.DownloadButton("Download a template CSV", value=dashboard.template, elem_id="batch-template")
            upload = gr.File(label="patients CSV", file_types=[".csv"], type="filepath", elem_id="batch-upload")
            batch_summary = gr.Markdown(elem_id="batch-summary")
            scored_file = gr.File(label="predictions CSV", elem_id="batch-result")
            invalid_rows = gr.Dataframe(pd.DataFrame(columns=INVALID_ROW_COLUMNS), label="invalid rows",
                                        elem_id="batch-invalid")
            upload.upload(dashboard.batch, upload, [batch_summary, scored_file, invalid_rows])
        with gr.Tab("Training", visible=False) as training_tab:
            run_picker = gr.Dropdown(label="training run", choices=[LATEST_RUN], value=LATEST_RUN,
                                     elem_id="training-run")
            training_note = gr.Markdown(elem_id="training-source")
            overall_plot = gr.Plot(label="global model", elem_id="training-global")
            with gr.Row():
                hospital_plot = gr.Plot(label="each hospital's evaluation", elem_id="training-hospitals")
                loss_plot = gr.Plot(label="local training loss", elem_id="training-loss")
            participation_plot = gr.Plot(label="participation", elem_id="training-participation")
        with gr.Tab("Models", visible=False) as models_tab:
            versions = gr.Dataframe(label="registered versions (newest first)", elem_id="model-versions")
            with gr.Row(visible=False) as admin_row:
                version = gr.Dropdown(label="version to promote", choices=[], value=None, elem_id="promote-version")
                promote_button = gr.Button("Promote to champion")
                rollback_button = gr.Button("Roll back to the previous champion")
            admin_result = gr.Markdown(elem_id="admin-result")
            report_summary = gr.Markdown(elem_id="model-report")
            report_table = gr.Dataframe(label="the champion on each hospital's test rows", elem_id="model-report-table")
            with gr.Row():
                roc_plot = gr.Plot(label="ROC", elem_id="model-roc")
                calibration_plot = gr.Plot(label="calibration", elem_id="model-calibration")
            report_outputs = [report_summary, report_table, roc_plot, calibration_plot]
            with gr.Row():
                compare_first = gr.Dropdown(label="compare version", choices=[], elem_id="compare-first")
                compare_second = gr.Dropdown(label="with version", choices=[], elem_id="compare-second")
            comparison_summary = gr.Markdown(elem_id="model-comparison")
            comparison_table = gr.Dataframe(label="the two versions on each hospital's test rows",
                                            elem_id="model-comparison-table")
            for picker in (compare_first, compare_second):
                picker.change(dashboard.compare, [compare_first, compare_second],
                              [comparison_summary, comparison_table])
            promote_button.click(dashboard.promote, version, [admin_result, versions]).then(
                dashboard.champion_report, None, report_outputs)
            rollback_button.click(dashboard.rollback, None, [admin_result, versions]).then(
                dashboard.champion_report, None, report_outputs)
        with gr.Tab("Hospitals", visible=False) as hospitals_tab:
            hospitals_note = gr.Markdown()
            hospitals_table = gr.Dataframe(elem_id="hospitals", datatype=HOSPITAL_COLUMN_TYPES)
        with gr.Tab("Monitoring", visible=False) as monitoring_tab:
            monitoring_summary = gr.Markdown(elem_id="monitoring")
            drift_table = gr.Dataframe(label="input drift by feature", elem_id="drift")
        # An operator's tabs load once when the page opens (`opened`, a one-shot timer) and refresh every
        # `refresh_s` (`timer`); a clinician's page runs neither, so it never asks for what its role may not see.
        timer = gr.Timer(refresh_s, active=False)
        opened = gr.Timer(0.1, active=False)
        blocks.load(dashboard.view, None, [who, training_tab, models_tab, hospitals_tab, monitoring_tab, admin_row,
                                           timer, opened, site])
        federation_outputs = [run_picker, training_note, overall_plot, hospital_plot, loss_plot, participation_plot,
                              hospitals_note, hospitals_table]
        # The one-shot tick only stops its timer; the tabs load after it. Loaded on the tick itself, a busy machine
        # let a second tick through before the first stopped the timer, and its late answer reset the pickers
        # over the user's pick.
        opening = opened.tick(dashboard.opened, None, opened, trigger_mode="once")
        for event in (opening.then, timer.tick, run_picker.input):
            event(dashboard.federation, run_picker, federation_outputs)
            event(dashboard.monitoring, None, [monitoring_summary, drift_table])
        opening.then(dashboard.registered, None, [versions, version, compare_first, compare_second])
        opening.then(dashboard.champion_report, None, report_outputs)
    return blocks


# Who may run each of the dashboard's functions (by the callback's name); a function missing here fails the build.
FUNCTION_ROLES: dict[str, Role] = {
    "view": "clinician", "template": "clinician", "predict": "clinician", "batch": "clinician",
    "federation": "operator", "monitoring": "operator", "registered": "operator", "champion_report": "operator",
    "compare": "operator", "opened": "operator",
    "promote": "admin", "rollback": "admin",
}
PAGE_EVENTS = ("load", "tick")  # what the page does by itself: running these is not the user's activity


def function_rules(blocks: gr.Blocks) -> dict[int, FunctionRule]:
    """Each of the blocks' functions (by the index a Gradio event names) with the role it needs."""
    rules: dict[int, FunctionRule] = {}
    for index, function in blocks.fns.items():
        if function.fn is None:  # a front-end-only event: nothing runs on the server
            continue
        if function.name not in FUNCTION_ROLES:
            raise ValueError(f"the dashboard function {function.name!r} has no role in FUNCTION_ROLES")
        user_action = any(event not in PAGE_EVENTS for _, event in function.targets)
        rules[index] = FunctionRule(FUNCTION_ROLES[function.name], user_action)
    return rules
