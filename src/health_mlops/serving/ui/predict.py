"""The Predict tab: one patient's risk (or predicted value) from the form, where it sits in the training population,
and what moved it (each feature's contribution, as text and a bar chart)."""

from __future__ import annotations

import math
import time
from typing import Any

import plotly.graph_objects as go
from pydantic import ValidationError

from health_mlops.metrics import share_below
from health_mlops.serving.predictor import NoChampion
from health_mlops.serving.requests import InvalidRequest
from health_mlops.serving.ui.shared import DashboardState
from health_mlops.spec import DatasetSpec


# A contribution that moves a risk by less than half a percentage point (a regression prediction by less than 1 %
# of the target's range) is within the rounding of what a clinician reads: listed as negligible, drawn in grey, and
# the plot's axis never shrinks below a few times this, so small effects do not look large.
NEGLIGIBLE_RISK = 0.005
NEGLIGIBLE_SHARE_OF_RANGE = 0.01
FEDERATED_RISK = "the federated model"  # the Predict tab's risk without a hospital's recalibration


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _field_errors(spec: DatasetSpec, error: ValidationError) -> str:
    """Each refused field as the Batch tab says a refused cell: the feature's label, the value entered, and what
    the spec allows, with its unit."""
    features = {f.name: f for f in spec.features}
    lines = []
    for problem in error.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        feature = features.get(name)
        if feature is None:
            lines.append(f"- **{name}**: {problem['msg']}")
            continue
        value, unit = problem.get("input"), f" {feature.unit}" if feature.unit else ""
        if value is None or value == "":
            said = f"missing value (allowed {feature.allowed()})"
        elif problem["type"] in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
            said = f"{value:g}{unit} is out of range (allowed {feature.allowed()})"
        elif feature.type == "numeric":
            said = f"{value!r} is not a number (allowed {feature.allowed()})"
        else:
            said = f"unknown category {value!r} (allowed {feature.allowed()})"
        lines.append(f"- **{feature.display_label}** ({name}): {said}")
    return "\n".join(lines)


def _shown(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return "not measured" if math.isnan(value) else f"{value:.4g}"


class PredictTab(DashboardState):
    """The Predict tab's callback: scored in-process with the champion, counted as endpoint "ui"."""

    def predict(self, *values: Any) -> tuple[str, go.Figure | None]:
        """The form's features, then the hospital whose recalibration to answer with (or `FEDERATED_RISK`)."""
        *entered, site = values
        row = dict(zip((f.name for f in self.spec.features), entered, strict=True))
        try:
            matrix = self.predictor.decode_form(row)
        except ValidationError as error:
            self.predictor.count_invalid("ui", 1)
            return "### Not scored: fix these fields\n" + _field_errors(self.spec, error), None
        hospital = None if site in (None, "", FEDERATED_RISK) else str(site)
        try:
            model, prediction = self.predictor.predict("ui", matrix, time.perf_counter(), hospital)
        except NoChampion as error:
            return f"### No model yet\n{error}", None
        except InvalidRequest:  # a value the page never offered: it is not echoed back
            self.predictor.count_invalid("ui", 1)
            current = self.predictor.current
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
        patients predicted lower (its percentile), and how often the test patients of its risk band (a tenth of them,
        by predicted risk) had the event."""
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
        tested = report.get("all_test_rows") or {}
        counts, bands = tested.get("risk_counts") or [], tested.get("risk_bands") or []
        if not sum(counts) or not bands:
            lines.append(f"_The report of v{version} holds no distribution of predicted risks: where this risk sits "
                         "among the test patients is not available._")
            return lines
        lower = share_below(counts, risk)
        lines.append(f"This risk is higher than the model predicted for **{_percent(lower)}** of the {sum(counts)} "
                     f"test patients at the hospitals ({_ordinal(math.floor(100 * lower))} percentile).")
        # The band holding this risk, else the nearest (a risk between bands, where no test patient was predicted)
        near = min(bands, key=lambda b: 0.0 if b["low"] <= risk < b["high"] else
                   min(abs(risk - b["low"]), abs(risk - b["high"])))
        lines.append(f"Calibration near this risk: of the {near['rows']} test patients predicted "
                     f"{_percent(near['low'])} to {_percent(near['high'])} (a tenth of them, by predicted risk), "
                     f"**{_percent(near['observed'])}** had {self.spec.target.display_label} (predicted "
                     f"{_percent(near['predicted'])} on average).")
        return lines


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
