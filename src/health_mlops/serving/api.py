"""The serving API: the champion model's predictions over REST, with request models built from the spec.

An invalid field gets 422 naming the field and its allowed range or categories; before any champion exists,
predictions answer 503 saying so, while the model and spec endpoints keep working.
"""

# No `from __future__ import annotations` here: the routes' request models are built at run time from the
# spec, and FastAPI must see those classes, not their names as strings.
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from health_mlops.data.preprocess import serving_matrix
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
    """The exported model's input for validated rows (the same encoding as for data files)."""
    return serving_matrix(pd.DataFrame([row.model_dump() for row in rows]), spec)


def fast_matrix(spec: DatasetSpec, body: Any) -> np.ndarray | None:
    """The batch's input matrix, checked column by column, if every row is exactly right; else None.

    A valid batch of 100,000 rows costs a few list passes here instead of 100,000 model validations. Any
    irregularity returns None, and the caller validates row by row to name the row and field at fault.
    """
    rows = body.get("rows") if isinstance(body, dict) and set(body) == {"rows"} else None
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_BATCH_ROWS:
        return None
    names = [f.name for f in spec.features]
    wanted = set(names)
    if not all(type(row) is dict and row.keys() == wanted for row in rows):
        return None
    matrix = np.empty((len(rows), len(names)), dtype=np.float32)
    for j, feature in enumerate(spec.features):
        column = [row[feature.name] for row in rows]
        if feature.type == "numeric":
            if not all(type(v) is float or type(v) is int for v in column):
                return None
            values = np.asarray(column, dtype=np.float64)
            low = -np.inf if feature.min is None else feature.min
            high = np.inf if feature.max is None else feature.max
            if not (np.isfinite(values).all() and (values >= low).all() and (values <= high).all()):
                return None
            matrix[:, j] = values
        else:
            index = {category: float(i) for i, category in enumerate(feature.categories or ())}
            codes = [index.get(v if type(v) is str else _as_text(v)) for v in column]  # type: ignore[arg-type]
            if None in codes:
                return None
            matrix[:, j] = codes
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

    @app.post("/api/v1/predict/batch", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": Batch.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def predict_batch(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise HTTPException(422, "the body is not JSON: expected {\"rows\": [{feature: value, ...}, ...]}") from None
        matrix = fast_matrix(spec, body)
        if matrix is None:  # not a clean batch: validate row by row for errors that name the row and field
            try:
                matrix = rows_to_matrix(spec, Batch.model_validate(body).rows)  # type: ignore[attr-defined]
            except ValidationError as error:
                raise RequestValidationError(error.errors()) from None
        model = champion("batch")
        predictions = model.predict(matrix)
        served_metrics.predictions.labels("batch", "ok").inc()
        served_metrics.rows.inc(len(matrix))
        served_metrics.latency.labels("batch").observe(time.perf_counter() - started)
        # Serialised here: FastAPI's generic encoder walks a 100,000-float list one value at a time.
        return Response(json.dumps({"predictions": predictions.tolist(), **answer(model)}),
                        media_type="application/json")

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
