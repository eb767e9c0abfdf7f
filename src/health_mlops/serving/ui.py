"""The dashboard: Gradio tabs over the same predictor, registry and federation as the REST API.

Predict and Batch score in-process with the champion (counted as endpoint "ui" in the serving metrics);
Training and Hospitals follow the federation live; Models shows the champion's federated model report and promotes
and rolls back with the admin token;
Monitoring reads the serving metrics and the champion's drift scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from pydantic import ValidationError

from health_mlops.data.io import read_table
from health_mlops.data.preprocess import serving_matrix
from health_mlops.data.validate import validate_table
from health_mlops.errors import DataError, RegistryError
from health_mlops.monitoring import histogram_quantile
from health_mlops.registry import Registry
from health_mlops.security import FailureThrottle, admin_refusal
from health_mlops.serving.drift import MIN_ROWS, SIGNIFICANT_PSI
from health_mlops.serving.predictor import NoChampion, Predictor
from health_mlops.serving.sources import DashboardSources, FederationState
from health_mlops.spec import DatasetSpec


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _field_errors(error: ValidationError) -> str:
    return "\n".join(f"- **{'.'.join(str(p) for p in e['loc'])}**: {e['msg']}" for e in error.errors())


class Dashboard:
    """The callbacks behind the tabs; each returns what its outputs show and never raises at the user."""

    def __init__(self, spec: DatasetSpec, predictor: Predictor, registry: Registry, sources: DashboardSources,
                 credentials_dir: Path, *, scratch: Path) -> None:
        self.spec = spec
        self.predictor = predictor
        self.registry = registry
        self.sources = sources
        self.credentials_dir = credentials_dir
        self.metric = spec.primary_metric
        self._last_count: tuple[float, float] | None = None  # (time, predictions) at the last monitoring view
        self._scratch = scratch  # batch results: patient rows, in the dashboard's private folder
        scratch.mkdir(mode=0o700, exist_ok=True)
        self._throttle = FailureThrottle()
        self._reports: dict[int, dict[str, Any] | None] = {}

    # --- Predict ----------------------------------------------------------------------------------------

    def predict(self, *values: Any) -> tuple[str, go.Figure | None]:
        row = dict(zip((f.name for f in self.spec.features), values, strict=True))
        try:
            validated = self.predictor.encoder.row_model.model_validate(row)
        except ValidationError as error:
            return "### Not scored: fix these fields\n" + _field_errors(error), None
        matrix = self.predictor.encoder.matrix_of([validated])
        try:
            model, prediction = self.predictor.predict("ui", matrix, time.perf_counter())
        except NoChampion as error:
            return f"### No model yet\n{error}", None
        found = self.predictor.explain(model, matrix)
        target = self.spec.target.name
        if self.spec.task == "binary":
            headline = f"### Risk of {target}: **{_percent(float(prediction[0]))}**"
            if model.threshold is not None:
                flagged = float(prediction[0]) >= model.threshold
                headline += (f"\n\n{'**Flagged**: at or above' if flagged else 'Not flagged: below'} the model's "
                             f"decision threshold of {_percent(model.threshold)}.\n")
            unit, scale = "percentage points", 100.0
        else:
            headline = f"### Predicted {target}: **{float(prediction[0]):.2f}**"
            unit, scale = target, 1.0
        lines = [headline, f"model v{model.version}. Main contributing features (change in the prediction if "
                 "the feature were at the training population's typical value instead):"]
        for c in found:
            lines.append(f"- **{c['feature']}** = {_shown(c['value'])} (typical {_shown(c['typical'])}): "
                         f"{scale * c['contribution']:+.2f} {unit}")
        figure = go.Figure(go.Bar(x=[scale * c["contribution"] for c in reversed(found)],
                                  y=[c["feature"] for c in reversed(found)], orientation="h",
                                  marker_color=["#c0392b" if c["contribution"] > 0 else "#2e86c1"
                                                for c in reversed(found)]))
        figure.update_layout(title=f"contribution ({unit})", height=300, margin={"l": 10, "r": 10, "t": 40, "b": 10})
        return "\n".join(lines), figure

    # --- Batch --------------------------------------------------------------------------------------------

    def batch(self, path: str | None) -> tuple[str, str | None, pd.DataFrame]:
        empty = pd.DataFrame(columns=["line", "reason"])
        if not path:
            return "Upload a CSV file with one column per feature (the Predict tab lists them).", None, empty
        try:
            validated = validate_table(read_table(Path(path)), self.spec, require_target=False)
        except DataError as error:
            return f"### The file cannot be used\n{error}", None, empty
        invalid = validated.quarantined_rows[["line", "reason"]]
        report = validated.report
        summary = f"{report.rows_read} rows read: **{report.rows_valid} scored**, **{report.rows_quarantined} invalid**"
        if report.rows_quarantined:
            summary += " (listed below with their line in the file and the reason; they are not in the output)"
        if validated.frame.empty:
            return f"### Nothing to score\n{summary}", None, invalid
        try:
            model, predictions = self.predictor.predict("ui", serving_matrix(validated.frame, self.spec),
                                                        time.perf_counter())
        except NoChampion as error:
            return f"### No model yet\n{error}", None, invalid
        scored = validated.frame.copy()
        scored.insert(0, "line", validated.lines)
        scored["prediction"] = predictions
        scored["model_version"] = model.version
        out = self._scratch / f"{Path(path).stem}-predictions.csv"
        scored.to_csv(out, index=False)
        return f"### Scored with model v{model.version}\n{summary}", str(out), invalid

    # --- Training and hospitals ------------------------------------------------------------------------

    def federation(self) -> tuple[str, go.Figure, go.Figure, str, pd.DataFrame]:
        """The Training and Hospitals tabs, from one look at the federation."""
        state = self.sources.federation()
        return (*self.training(state), *self.hospitals(state))

    def training(self, state: FederationState) -> tuple[str, go.Figure, go.Figure]:
        overall = go.Figure()
        for run in state.runs:
            if run.global_metric:
                rounds, values = zip(*run.global_metric, strict=True)
                overall.add_trace(go.Scatter(x=rounds, y=values, mode="lines+markers", name=f"{run.id} ({run.status})"))
        overall.update_layout(title=f"global model {self.metric} by round (federated evaluation)", height=360,
                              xaxis={"title": "round", "dtick": 1}, yaxis_title=self.metric)
        per_hospital = go.Figure()
        latest = state.runs[-1] if state.runs else None
        for hospital, curve in (latest.hospital_metric.items() if latest else []):
            if curve:
                rounds, values = zip(*curve, strict=True)
                per_hospital.add_trace(go.Scatter(x=rounds, y=values, mode="lines+markers", name=hospital))
        per_hospital.update_layout(title=f"{latest.id if latest else 'no run yet'}: {self.metric} at each hospital",
                                   height=360, xaxis={"title": "round", "dtick": 1}, yaxis_title=self.metric)
        note = _source_note(state) + ("" if state.runs else "\n\nNo training run yet: `health-mlops demo` starts one.")
        if latest is not None and latest.privacy is not None:
            privacy = latest.privacy
            note += (f"\n\n{latest.id} trains with differential privacy (DP-SGD): ε spent so far "
                     f"**{privacy['epsilon']:.2f}** of {privacy['budget_epsilon']:g} at δ = {privacy['delta']:g} "
                     "(the most any hospital has spent).")
        return note, overall, per_hospital

    def hospitals(self, state: FederationState) -> tuple[str, pd.DataFrame]:
        table = pd.DataFrame([{"hospital": h.hospital, "status": h.status, "rows trained on": h.rows,
                               "rows quarantined": h.rows_quarantined, "last round": h.last_round,
                               self.metric: None if h.metric is None else round(h.metric, 4),
                               "small cells suppressed": _suppressed(h.suppressed),
                               "privacy ε spent": None if h.epsilon is None else round(h.epsilon, 3)}
                              for h in state.hospitals],
                             columns=["hospital", "status", "rows trained on", "rows quarantined", "last round",
                                      self.metric, "small cells suppressed", "privacy ε spent"])
        return _source_note(state), table

    # --- Models ------------------------------------------------------------------------------------------

    def models(self) -> pd.DataFrame:
        try:
            versions = self.registry.versions()
        except Exception:  # noqa: BLE001 - the registry may be away; show nothing rather than fail the page
            versions = []
        return pd.DataFrame([{"version": v.version, "aliases": ", ".join(v.aliases), "metric": v.metric_name,
                              "value": round(v.metric, 4), "differential privacy": v.privacy_text(),
                              "federation run": v.federation_run,
                              "registered": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))}
                             for v in reversed(versions)],
                            columns=["version", "aliases", "metric", "value", "differential privacy", "federation run",
                                     "registered"])

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

    def promote(self, token: str, version: float | None, request: gr.Request) -> tuple[str, pd.DataFrame]:
        return self._admin_action(token, lambda: self.registry.promote(int(version or 0), actor="admin (dashboard)"),
                                  "promote", "promoted", request)

    def rollback(self, token: str, request: gr.Request) -> tuple[str, pd.DataFrame]:
        return self._admin_action(token, lambda: self.registry.rollback(actor="admin (dashboard)"), "rollback",
                                  "rolled back to", request)

    def _admin_action(self, token: str, action: Callable[[], Any], name: str, verb: str,
                      request: gr.Request | None) -> tuple[str, pd.DataFrame]:
        refusal = admin_refusal(token, self.credentials_dir)
        if refusal:
            source = request.client.host if request is not None and request.client else "unknown"
            self.registry.audit.append(f"dashboard {name}", "unknown (dashboard)", outcome="refused 401",
                                       model=self.registry.model_name, reason=refusal, source=source)
            time.sleep(self._throttle.failed(source, refusal))  # a worker thread: guessing slows, others do not
            return f"**Refused:** {refusal}", self.models()
        try:
            version = action()
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
        lines = ["| endpoint | ok | invalid | no model | p50 latency | p99 latency |", "|---|---:|---:|---:|---:|---:|"]
        for endpoint in ("predict", "batch", "ui"):
            p50, p99 = (histogram_quantile(metrics.latency, q, endpoint=endpoint) for q in (0.5, 0.99))
            ok, invalid, no_model = (counts.get((endpoint, outcome), 0) for outcome in ("ok", "invalid", "no_model"))
            lines.append(f"| {endpoint} | {ok:.0f} | {invalid:.0f} | {no_model:.0f} | {_ms(p50)} | {_ms(p99)} |")
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


def _report_summary(version: int, report: dict[str, Any]) -> str:
    config = report.get("config", {})
    privacy = report.get("privacy")
    lines = [f"### Champion v{version}: federated model report",
             f"Federation run `{report['federation_run']}`: {config.get('strategy', {}).get('name', '?')}, "
             f"{config.get('rounds', '?')} rounds, {len(report['per_hospital'])} hospitals; "
             + ("differential privacy ε = {:.2f}, δ = {:g}.".format(privacy["epsilon"], privacy["delta"])
                if privacy else "no differential privacy.")]
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
        with gr.Tab("Predict"):
            inputs: list[gr.components.Component] = []
            sources = list(dict.fromkeys(f.source.value for f in spec.features))
            for source in sources:
                gr.Markdown(f"**{source.replace('_', ' ')}**")
                with gr.Row():
                    for j, feature in enumerate(spec.features):
                        if feature.source.value != source:
                            continue
                        label = f"{feature.name} ({feature.unit})" if feature.unit else feature.name
                        if feature.type == "numeric":
                            value = round(typical[j], 1) if typical else (feature.min or 0.0)
                            inputs.append(gr.Number(label=label, value=value, elem_id=f"input-{feature.name}",
                                                    info=f"{feature.min} to {feature.max}", min_width=140))
                        else:
                            choices = list(feature.categories or ())
                            choice = choices[int(typical[j])] if typical else choices[0]
                            inputs.append(gr.Radio(choices, value=choice, label=label, elem_id=f"input-{feature.name}",
                                                   min_width=140))
            predict_button = gr.Button("Predict", variant="primary", elem_id="predict-button")
            with gr.Row():
                risk = gr.Markdown(elem_id="prediction")
                contributions = gr.Plot(label="main contributing features")
            predict_button.click(dashboard.predict, inputs, [risk, contributions])
        with gr.Tab("Batch"):
            gr.Markdown("Upload a CSV with one column per feature; download it back with a `prediction` column. "
                        "Invalid rows are listed with their line and reason, never dropped silently.")
            upload = gr.File(label="patients CSV", file_types=[".csv"], type="filepath", elem_id="batch-upload")
            batch_summary = gr.Markdown(elem_id="batch-summary")
            scored_file = gr.File(label="predictions CSV", elem_id="batch-result")
            invalid_rows = gr.Dataframe(label="invalid rows", elem_id="batch-invalid")
            upload.upload(dashboard.batch, upload, [batch_summary, scored_file, invalid_rows])
        with gr.Tab("Training"):
            training_note = gr.Markdown(elem_id="training-source")
            overall_plot = gr.Plot(elem_id="training-global")
            hospital_plot = gr.Plot(elem_id="training-hospitals")
        with gr.Tab("Models"):
            versions = gr.Dataframe(label="registered versions (newest first)", elem_id="model-versions")
            with gr.Row():
                admin_token = gr.Textbox(label="admin token", type="password")
                version = gr.Number(label="version to promote", precision=0)
            with gr.Row():
                promote_button = gr.Button("Promote to champion")
                rollback_button = gr.Button("Roll back to the previous champion")
            admin_result = gr.Markdown(elem_id="admin-result")
            report_summary = gr.Markdown(elem_id="model-report")
            report_table = gr.Dataframe(label="the champion on each hospital's test rows", elem_id="model-report-table")
            with gr.Row():
                roc_plot = gr.Plot(label="ROC", elem_id="model-roc")
                calibration_plot = gr.Plot(label="calibration", elem_id="model-calibration")
            report_outputs = [report_summary, report_table, roc_plot, calibration_plot]
            promote_button.click(dashboard.promote, [admin_token, version], [admin_result, versions]).then(
                dashboard.champion_report, None, report_outputs)
            rollback_button.click(dashboard.rollback, admin_token, [admin_result, versions]).then(
                dashboard.champion_report, None, report_outputs)
        with gr.Tab("Hospitals"):
            hospitals_note = gr.Markdown()
            hospitals_table = gr.Dataframe(elem_id="hospitals")
        with gr.Tab("Monitoring"):
            monitoring_summary = gr.Markdown(elem_id="monitoring")
            drift_table = gr.Dataframe(label="input drift by feature", elem_id="drift")
        timer = gr.Timer(refresh_s)
        for event in (blocks.load, timer.tick):
            event(dashboard.federation, None, [training_note, overall_plot, hospital_plot, hospitals_note,
                                               hospitals_table])
            event(dashboard.monitoring, None, [monitoring_summary, drift_table])
        blocks.load(dashboard.models, None, versions)
        blocks.load(dashboard.champion_report, None, report_outputs)
    return blocks
