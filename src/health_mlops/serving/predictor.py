"""Predictions by the current champion, with their metrics: shared by the REST API and the dashboard."""

from __future__ import annotations

import time

import numpy as np

from health_mlops.monitoring import ServingMetrics
from health_mlops.serving.explain import contributions
from health_mlops.serving.model import ChampionWatcher, ServedModel
from health_mlops.serving.requests import InvalidRequest, RowEncoder
from health_mlops.spec import DatasetSpec

EXPLAINED_FEATURES = 5
ENDPOINTS = ("predict", "batch", "ui")
# ok; invalid: the client's rows are not what the spec allows (422, 415); no_model: no champion yet (503);
# error: the model failed on valid rows (500): the service's fault.
OUTCOMES = ("ok", "invalid", "no_model", "error")
NO_CHAMPION = ("no champion model yet: train one (`health-mlops demo` or a federated run) and it is served as "
               "soon as it is registered")


class NoChampion(Exception):
    """No model has passed the quality gate yet: predictions answer 503."""


class Predictor:
    """Predictions by the current champion, counted in the serving metrics: the API and the UI share it."""

    def __init__(self, spec: DatasetSpec, watcher: ChampionWatcher, metrics: ServingMetrics) -> None:
        self.spec = spec
        self.watcher = watcher
        self.metrics = metrics
        self.encoder = RowEncoder(spec)
        # Labelled children looked up once: the lookup would cost a single prediction a few percent.
        self._counted = {(e, o): metrics.predictions.labels(e, o) for e in ENDPOINTS for o in OUTCOMES}
        self._latency = {e: metrics.latency.labels(e) for e in ENDPOINTS}

    def count(self, endpoint: str, outcome: str) -> None:
        self._counted[endpoint, outcome].inc()

    def count_invalid(self, endpoint: str, rows: int) -> None:
        """A request refused for its rows, `rows` of them invalid."""
        self._counted[endpoint, "invalid"].inc()
        self.count_invalid_rows(endpoint, rows)

    def count_invalid_rows(self, endpoint: str, rows: int) -> None:
        """Invalid rows of a file scored in part (the request itself counts as ok)."""
        self.metrics.invalid_rows.labels(endpoint).inc(rows)

    def champion(self, endpoint: str) -> ServedModel:
        model = self.watcher.current  # taken once: a swap during this request does not affect it
        if model is None:
            self.count(endpoint, "no_model")
            raise NoChampion(NO_CHAMPION)
        return model

    def predict(self, endpoint: str, matrix: np.ndarray, started: float, hospital: str | None = None
                ) -> tuple[ServedModel, np.ndarray]:
        """One request's rows scored by the champion (`started`: when the request began); with `hospital`, as
        that hospital recalibrated it (`InvalidRequest` naming the field if the model has no such calibration)."""
        model = self.champion(endpoint)
        if hospital is not None and hospital not in model.sites:
            known = ", ".join(sorted(model.sites)) or "none"
            raise InvalidRequest([{"loc": ["query", "hospital"], "type": "value_error",
                                   "msg": f"no recalibration for hospital {hospital[:100]!r} in model version "
                                          f"{model.version}; its hospitals: {known}"}])
        try:
            predictions = model.predict(matrix)
            if hospital is not None:
                predictions = model.at_site(predictions, hospital)
        except Exception:
            self.count(endpoint, "error")
            raise
        model.drift.observe(matrix)
        self._counted[endpoint, "ok"].inc()
        self._latency[endpoint].observe(time.perf_counter() - started)
        return model, predictions

    def explain(self, model: ServedModel, row: np.ndarray, top: int | None = EXPLAINED_FEATURES) -> list[dict]:
        return [vars(c) for c in contributions(model, self.spec, row, model.typical, top)]

    def refresh_metrics(self) -> None:
        """Gauges that describe the current model: set when scraped, so they are always current."""
        model = self.watcher.current
        if model is not None:
            self.metrics.model_version.set(model.version)
            for feature, score in model.drift.scores().items():
                self.metrics.drift.labels(feature).set(score)
            self.metrics.drift_rows.set(model.drift.rows_seen)


