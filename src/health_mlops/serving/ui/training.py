"""The Training tab: a federation run's progress, round by round: the global model's metric, each hospital's metric
and local training loss, and which hospitals' results counted."""

from __future__ import annotations

from typing import Any

import gradio as gr
import plotly.graph_objects as go

from health_mlops.serving.sources import FederationState, TrainingRun
from health_mlops.serving.ui.shared import DashboardState, source_note


LATEST_RUN = "the latest run"


class TrainingTab(DashboardState):
    """The Training tab's view of one look at the federation (`Dashboard.federation` takes the look)."""

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
        note = source_note(state) + ("" if state.runs else "\n\nNo training run yet: `health-mlops demo` starts one.")
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
