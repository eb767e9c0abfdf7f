"""The serving API: the champion model's predictions over REST, with request models built from the spec.

An invalid field gets 422 naming the field and its allowed range or categories; before any champion exists,
predictions answer 503 saying so, while the model and spec endpoints keep working.
"""

# No `from __future__ import annotations` here: the routes' request models are built at run time from the
# spec, and FastAPI must see those classes, not their names as strings.
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from health_mlops.http_errors import install_validation_handler
from health_mlops.monitoring import ServingMetrics
from health_mlops.serving.model import ChampionWatcher, ServedModel
from health_mlops.spec import DatasetSpec

MAX_BATCH_ROWS = 200_000


def _as_text(value: object) -> object:
    # Categories are text in the spec ("0", "1"); JSON clients often send them as numbers or booleans.
    if isinstance(value, bool):
        return str(int(value))
    return str(value) if isinstance(value, int | float) else value


def row_model(spec: DatasetSpec) -> type[BaseModel]:
    """The request model of one row: every spec feature, typed and bounded as the spec says."""
    fields: dict[str, Any] = {}
    for feature in spec.features:
        description = f"{feature.description} ({feature.unit})" if feature.unit else feature.description
        if feature.type == "numeric":
            annotation: Any = Annotated[float, Field(ge=feature.min, le=feature.max, allow_inf_nan=False,
                                                     description=description)]
        else:
            categories = tuple(feature.categories or ())
            annotation = Annotated[Literal[categories], BeforeValidator(_as_text),  # type: ignore[valid-type]
                                   Field(description=description)]
        fields[feature.name] = (annotation, ...)
    return create_model(f"{spec.name.title().replace('-', '')}Row", __config__=ConfigDict(extra="forbid"),
                        **fields)


def rows_to_matrix(spec: DatasetSpec, rows: list[BaseModel]) -> np.ndarray:
    """The exported model's input: one float32 column per feature, categories as their index in the spec."""
    matrix = np.empty((len(rows), len(spec.features)), dtype=np.float32)
    for j, feature in enumerate(spec.features):
        values = [getattr(row, feature.name) for row in rows]
        if feature.type == "numeric":
            matrix[:, j] = values
        else:
            index = {category: i for i, category in enumerate(feature.categories or ())}
            matrix[:, j] = [index[v] for v in values]
    return matrix


def feature_view(spec: DatasetSpec) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": f.type, "unit": f.unit, "min": f.min, "max": f.max,
             "categories": list(f.categories) if f.categories else None, "source": f.source.value,
             "description": f.description} for f in spec.features]


def create_serving_app(spec: DatasetSpec, watcher: ChampionWatcher, metrics: ServingMetrics | None = None) -> FastAPI:
    served_metrics = metrics or ServingMetrics()
    Row = row_model(spec)
    Batch = create_model("Batch", __config__=ConfigDict(extra="forbid"),
                         rows=(Annotated[list[Row], Field(min_length=1, max_length=MAX_BATCH_ROWS)], ...))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with suppress(Exception):  # no registry yet is fine: predictions say 503 until a champion exists
            watcher.refresh()
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPI(title="Health MLOps serving", version="1", lifespan=lifespan)
    install_validation_handler(app)

    def champion(endpoint: str) -> ServedModel:
        model = watcher.current  # taken once: a swap during this request does not affect it
        if model is None:
            served_metrics.predictions.labels(endpoint, "no_model").inc()
            raise HTTPException(503, "no champion model yet: train one (`health-mlops demo` or a federated run) "
                                     "and it is served as soon as it is registered")
        served_metrics.model_version.set(model.version)
        return model

    def answer(model: ServedModel) -> dict[str, Any]:
        return {"model_version": model.version, "task": model.spec.task, "target": model.spec.target.name}

    @app.post("/api/v1/predict")
    def predict(row: Row) -> dict[str, Any]:  # type: ignore[valid-type]
        started = time.perf_counter()
        model = champion("predict")
        prediction = model.predict(rows_to_matrix(spec, [row]))
        served_metrics.predictions.labels("predict", "ok").inc()
        served_metrics.latency.labels("predict").observe(time.perf_counter() - started)
        return {"prediction": float(prediction[0]), **answer(model)}

    @app.post("/api/v1/predict/batch")
    def predict_batch(batch: Batch) -> dict[str, Any]:  # type: ignore[valid-type]
        started = time.perf_counter()
        model = champion("batch")
        rows = batch.rows  # type: ignore[attr-defined]
        predictions = model.predict(rows_to_matrix(spec, rows))
        served_metrics.predictions.labels("batch", "ok").inc()
        served_metrics.rows.inc(len(rows))
        served_metrics.latency.labels("batch").observe(time.perf_counter() - started)
        return {"predictions": predictions.tolist(), **answer(model)}

    @app.get("/api/v1/model")
    def model_info() -> dict[str, Any]:
        model = watcher.current
        described = model.describe() if model else {"version": None, "metrics": {}, "federation_run": None}
        return {**described, "task": spec.task, "target": spec.target.name, "spec": {"name": spec.name,
                                                                                     "features": feature_view(spec)}}

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> str:
        return "ready"  # serving without a champion is a normal state: the UI works, predict says 503

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(served_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def count_invalid(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if response.status_code == 422 and request.url.path.startswith("/api/v1/predict"):
            endpoint = "batch" if request.url.path.endswith("batch") else "predict"
            served_metrics.predictions.labels(endpoint, "invalid").inc()
        return response

    return app
