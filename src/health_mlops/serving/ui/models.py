"""The Models tab: the registered versions, promote and roll back (for an admin), the champion's federated model
report (a summary, each hospital's metrics, ROC and calibration curves), and two versions' reports compared."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gradio as gr
import pandas as pd
import plotly.graph_objects as go

from health_mlops.errors import RegistryError
from health_mlops.registry import ModelVersion
from health_mlops.serving.ui.shared import DashboardState


class ModelsTab(DashboardState):
    """The Models tab's callbacks, over the registry (which may be away: the tab then says so)."""

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


# What each column of the report's table says, in a sentence a clinician can act on.
METRIC_WORDS = {
    "AUC": "the chance that a patient who had the event was given a higher risk than one who did not (0.5 is a coin "
           "toss, 1 a perfect ranking); the interval is where it would fall on another sample of patients.",
    "Brier": "the mean squared gap between the predicted risk and what happened (0 is perfect; for a rare event, "
             "compare it with the event rate itself, what predicting the average would score).",
    "calibration slope": "how far the risks spread compared with what happened: 1 is right, above 1 the risks are "
                         "too timid (the sick predicted too low, the well too high), below 1 too extreme.",
    "calibration intercept": "whether the risks are too high or too low on average: 0 is right, positive means "
                             "more events happened than the risks said.",
    "sensitivity": "of the patients who had the event, the share the model flagged.",
    "specificity": "of the patients who did not, the share it left unflagged.",
    "PPV": "of the flagged patients, the share who had the event: at a low threshold most flagged patients do not "
           "(0.10 is one in ten), the price of missing few.",
    "NPV": "of the patients not flagged, the share who did not have the event.",
    "balanced accuracy": "the mean of sensitivity and specificity.",
    "all test rows (from counts)": "every hospital's test patients together, computed from the counts each hospital "
                                   "sent (no patient row left a hospital); the AUC is exact to within the ± shown.",
}


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
    lines.append("How to read the table:\n" + "\n".join(f"- **{name}**: {words}"
                                                         for name, words in METRIC_WORDS.items()))
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
    # Deciles of each hospital's predicted risk (a report from before them: bins a tenth wide), on the scale of the
    # risks the test patients got, so that a 3 % event rate does not crowd into the corner of a 0-1 plot.
    bands = {h: c.get("risk_bands") or c["reliability"] for h, c in curves.items()}
    top = max([b["predicted"] for bins in bands.values() for b in bins]
              + [b["observed"] for bins in bands.values() for b in bins] + [0.01])
    figure.add_scatter(x=[0, top], y=[0, top], mode="lines", line={"dash": "dot", "color": "grey"},
                       name="perfectly calibrated")
    for hospital, bins in bands.items():
        figure.add_scatter(x=[b["predicted"] for b in bins], y=[b["observed"] for b in bins], mode="lines+markers",
                           text=[f"{b['rows']} test patients predicted {100 * b['low']:.1f} to {100 * b['high']:.1f} %"
                                 for b in bins],
                           hovertemplate="predicted %{x:.1%}, observed %{y:.1%}<br>%{text}", name=hospital)
    figure.update_layout(title="Calibration: observed event rate by predicted risk (each hospital's test patients "
                               "in tenths by predicted risk)",
                         xaxis_title="mean predicted risk", yaxis_title="observed event rate", xaxis_tickformat=".0%",
                         yaxis_tickformat=".0%", xaxis_range=[0, top * 1.05], yaxis_range=[0, top * 1.05], height=420)
    return figure
