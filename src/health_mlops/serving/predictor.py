"""Predictions by the current champion, with their metrics: the one object the REST API and the dashboard talk to
(what a request may hold, the champion, its predictions and explanations, what was served and how fast)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import generate_latest

from health_mlops.errors import RegistryError
from health_mlops.monitoring import ServingMetrics, histogram_quantile
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


class NoChampion(RegistryError):
    """No model has passed the quality gate yet: predictions answer 503."""


@dataclass(frozen=True)
class ServingSummary:
    """What was served since the process started, as the Monitoring tab shows it."""

    requests: dict[tuple[str, str], float]  # (endpoint, outcome) -> requests
    invalid_rows: dict[str, float]  # endpoint -> rows refused
    latency: dict[str, tuple[float | None, float | None]]  # endpoint -> upper bounds of its p50 and p99, seconds


class Predictor:
    """Predictions by the current champion, counted in the serving metrics: the API and the UI share it."""

    def __init__(self, spec: DatasetSpec, watcher: ChampionWatcher, metrics: ServingMetrics) -> None:
        self.spec = spec
        self._watcher = watcher
        self._metrics = metrics
        self._encoder = RowEncoder(spec)
        # Labelled children looked up once: the lookup would cost a single prediction a few percent.
        self._counted = {(e, o): metrics.predictions.labels(e, o) for e in ENDPOINTS for o in OUTCOMES}
        self._latency = {e: metrics.latency.labels(e) for e in ENDPOINTS}

    @property
    def current(self) -> ServedModel | None:
        """The champion served now (None before the first): read it once per request, as a swap may follow."""
        return self._watcher.current

    def request_schemas(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The JSON schemas of one patient's row and of a batch of rows."""
        return (self._encoder.row_model.model_json_schema(),
                self._encoder.batch_model.model_json_schema(ref_template="#/components/schemas/{model}"))

    def decode_one(self, body: bytes) -> np.ndarray:
        """One patient's JSON row as the model's input (`InvalidRequest` naming each field that is wrong)."""
        return self._encoder.one(body)

    def decode_batch(self, body: bytes) -> np.ndarray:
        """`{"rows": [...]}` as the model's input, a row each (`InvalidRequest` naming each row and field)."""
        return self._encoder.batch(body)

    def decode_form(self, row: dict[str, Any]) -> np.ndarray:
        """A form's values as the model's input (pydantic's `ValidationError` naming each field that is wrong)."""
        return self._encoder.matrix_of([self._encoder.row_model.model_validate(row)])

    def count(self, endpoint: str, outcome: str) -> None:
        self._counted[endpoint, outcome].inc()

    def count_invalid(self, endpoint: str, rows: int) -> None:
        """A request refused for its rows, `rows` of them invalid."""
        self._counted[endpoint, "invalid"].inc()
        self.count_invalid_rows(endpoint, rows)

    def count_invalid_rows(self, endpoint: str, rows: int) -> None:
        """Invalid rows of a file scored in part (the request itself counts as ok)."""
        self._metrics.invalid_rows.labels(endpoint).inc(rows)

    def champion(self, endpoint: str) -> ServedModel:
        model = self._watcher.current  # taken once: a swap during this request does not affect it
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
        if endpoint == "batch":
            self._metrics.rows.inc(len(matrix))
        self._latency[endpoint].observe(time.perf_counter() - started)
        return model, predictions

    def explain(self, model: ServedModel, row: np.ndarray, top: int | None = EXPLAINED_FEATURES) -> list[dict]:
        return [vars(c) for c in contributions(model, self.spec, row, model.typical, top)]

    def exposition(self) -> bytes:
        """The serving metrics in Prometheus' text format, with the gauges that describe the current model set now
        (so they are always current)."""
        model = self._watcher.current
        if model is not None:
            self._metrics.model_version.set(model.version)
            for feature, score in model.drift.scores().items():
                self._metrics.drift.labels(feature).set(score)
            self._metrics.drift_rows.set(model.drift.rows_seen)
        return generate_latest(self._metrics.registry)

    def summary(self) -> ServingSummary:
        requests = {(s.labels["endpoint"], s.labels["outcome"]): s.value
                    for s in next(iter(self._metrics.predictions.collect())).samples if s.name.endswith("_total")}
        invalid_rows = {s.labels["endpoint"]: s.value for s in next(iter(self._metrics.invalid_rows.collect())).samples
                        if s.name.endswith("_total")}
        latency = {endpoint: (histogram_quantile(self._metrics.latency, 0.5, endpoint=endpoint),
                              histogram_quantile(self._metrics.latency, 0.99, endpoint=endpoint))
                   for endpoint in ENDPOINTS}
        return ServingSummary(requests, invalid_rows, latency)


