"""The federated model report: what a consortium reads about a model before it trusts it, built from what the
hospitals sent (no rows, no I/O here).

For the final model (the round with the least validation loss), per hospital: the metrics it computed on its own
test rows, without and with its own recalibration (`ml.site_calibration`), its ROC and reliability curves
(from its score and calibration counts); over hospitals: the mean (what the field reports) and the metrics of
all test rows together, built from the counts (the AUC within its stated bound). Then how training went (each
round's metrics and losses), the data each hospital brought (rows, events, quarantined, missing values) and the
privacy settings. It is stored in MLflow with the model version and shown in the dashboard's Models tab.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from health_mlops.data.preprocess import feature_columns, value_width
from health_mlops.fl.privacy_budget import privacy_report
from health_mlops.fl.state import Run, TaskKind
from health_mlops.fl.messages import weighted_metrics
from health_mlops.fl.metadata import FitMetadata
from health_mlops.metrics import (BinarySummary, combine, hospitals_averaged, mean_over_hospitals,
                                  undefined_from_counts)
from health_mlops.spec import DatasetSpec

REPORT_VERSION = 1
ROC_POINTS = 101  # a curve is sent at most this many points: enough to draw, small to store


def _thinned(fpr: list[float], tpr: list[float]) -> dict[str, list[float]]:
    """The ROC curve's corners only (a step curve drawn from its corners is the same curve), thinned evenly."""
    points = [(x, y) for i, (x, y) in enumerate(zip(fpr, tpr, strict=True))
              if i in (0, len(fpr) - 1) or (x, y) != (fpr[i - 1], tpr[i - 1])]
    if len(points) > ROC_POINTS:
        keep = np.unique(np.linspace(0, len(points) - 1, ROC_POINTS).round().astype(int))
        points = [points[k] for k in keep]
    return {"fpr": [round(x, 6) for x, _ in points], "tpr": [round(y, 6) for _, y in points]}


def _finite(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: (float(v) if isinstance(v, int | float) and np.isfinite(v) else None) for k, v in metrics.items()}


def data_summary(run: Run, spec: DatasetSpec) -> dict[str, dict[str, Any]]:
    """Per hospital, from its round-0 counts: training rows, events (binary tasks), rows quarantined, and values
    missing per feature that allows them (null where the hospital withheld a small count)."""
    stats = next((r.stats() for r in run.history if r.kind is TaskKind.stats), {})
    columns = feature_columns(spec)
    found: dict[str, dict[str, Any]] = {}
    for hospital, sent in stats.items():
        observed = sent.observed or [sent.count] * len(sent.sums)
        missing: dict[str, int | None] = {}
        for feature in spec.features:
            if feature.missing is not None:  # a feature's value columns share its observed count, unless withheld
                counts = [o for j in columns[feature.name][:value_width(feature)] if (o := observed[j]) is not None]
                missing[feature.name] = sent.count - counts[0] if counts else None
        found[hospital] = {"rows": sent.count, "rows_quarantined": sent.rows_quarantined, "missing_values": missing,
                           **({"events": round(sent.target_sum)} if spec.task == "binary" else {})}
    return found


def model_report(run: Run, spec: DatasetSpec) -> dict[str, Any]:
    """The report of a completed run's final model (see the module's docstring)."""
    evaluated = [r for r in run.history if r.kind is not TaskKind.stats]
    final = evaluated[-1].evaluations()
    per_hospital = {h: dict(m.metrics) for h, m in final.items()}
    report: dict[str, Any] = {
        "version": REPORT_VERSION, "federation_run": run.id, "task": spec.task, "metric": spec.primary_metric,
        "threshold": None if run.preprocessing is None else run.preprocessing.threshold, "per_hospital": per_hospital,
        "test_rows": {h: m.num_test_examples for h, m in final.items()},
        "mean_over_hospitals": mean_over_hospitals(per_hospital),
        "hospitals_averaged": hospitals_averaged(per_hospital),
        "history": [{"round": r.round, "kind": r.kind.value, "global": weighted_metrics(r.evaluations()),
                     "hospitals": {h: {"metrics": dict(m.metrics),
                                       "train_loss": m.train_loss if isinstance(m, FitMetadata) else None}
                                   for h, m in r.evaluations().items()}} for r in evaluated],
        "selected_round": run.selected_round,
        "validation_loss": None if run.best_round is None else run.best_loss,
        "data": data_summary(run, spec), "excluded": dict(run.excluded),
        "config": run.config.model_dump(mode="json"), "privacy": privacy_report(run),
        "missing_indicators": [f.name for f in spec.features if f.has_indicator],
    }
    calibrated = {h: dict(m.calibrated_metrics) for h, m in final.items() if m.calibrated_metrics is not None}
    if calibrated:  # each hospital's metrics with its own recalibration, flagged above its own event rate
        report["site_calibration"] = {h: m.site_calibration.model_dump() for h, m in final.items()
                                      if m.site_calibration is not None}
        report["per_hospital_calibrated"] = calibrated
        report["mean_over_hospitals_calibrated"] = mean_over_hospitals(calibrated)
        compared = {h: m.local_comparison for h, m in final.items() if m.local_comparison is not None}
        report["local_comparison"] = {h: c.model_dump() for h, c in compared.items()}
        # What a hospital is told when the federation, even recalibrated to it, serves it worse than its own model
        report["local_better"] = {
            h: (f"{h}'s own logistic regression fits its validation rows better than the federated model it "
                f"recalibrated (log loss {c.local_loss:.4f} against {c.federated_loss:.4f}): its patients may be "
                "better served by its own model")
            for h, c in compared.items() if c.local_loss < c.federated_loss}
    summaries = {h: BinarySummary.from_json(m.summary.model_dump()) for h, m in final.items() if m.summary is not None}
    if summaries:
        report["undefined"] = {h: undefined_from_counts(s, spec.target.name) for h, s in summaries.items()}
        report["curves"] = {h: {"roc": _thinned(*s.roc_curve()), "reliability": s.reliability(),
                                "risk_bands": s.risk_bands()}
                            for h, s in summaries.items()}
        pooled = combine(summaries.values())
        report["all_test_rows"] = {**_finite(pooled.metrics()), "reliability": pooled.reliability(),
                                   "risk_bands": pooled.risk_bands(), "risk_counts": pooled.risk_counts(),
                                   "roc": _thinned(*pooled.roc_curve())}
    return report
