"""The Monitoring tab: the serving metrics (requests by endpoint and outcome, latency, throughput) and the champion's
input drift by feature."""

from __future__ import annotations

import time

import pandas as pd

from health_mlops.serving.drift import MIN_ROWS, SIGNIFICANT_PSI
from health_mlops.serving.ui.shared import DashboardState


class MonitoringTab(DashboardState):
    """The Monitoring tab's callback; its throughput counts the predictions served since the previous view."""

    # (time, predictions) at the last monitoring view: none before the first, which sets it on the dashboard
    _last_count: tuple[float, float] | None = None

    def monitoring(self) -> tuple[str, pd.DataFrame]:
        served_so_far = self.predictor.summary()
        counts = served_so_far.requests
        served = sum(v for (_, outcome), v in counts.items() if outcome == "ok")
        now = time.monotonic()
        rate = None
        if self._last_count is not None and now > self._last_count[0]:
            rate = (served - self._last_count[1]) / (now - self._last_count[0])
        self._last_count = (now, served)
        invalid_rows = served_so_far.invalid_rows
        lines = ["Requests by outcome: *invalid* is the client's input (422), *no model* and *error* the service's.",
                 "", "| endpoint | ok | invalid (rows) | no model | error | p50 latency | p99 latency |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for endpoint in ("predict", "batch", "ui"):
            p50, p99 = served_so_far.latency[endpoint]
            ok, invalid, no_model, error = (counts.get((endpoint, outcome), 0)
                                            for outcome in ("ok", "invalid", "no_model", "error"))
            lines.append(f"| {endpoint} | {ok:.0f} | {invalid:.0f} ({invalid_rows.get(endpoint, 0):.0f}) | "
                         f"{no_model:.0f} | {error:.0f} | {_ms(p50)} | {_ms(p99)} |")
        model = self.predictor.current
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


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"≤ {1000 * seconds:g} ms"
