"""The serving API: the champion model's predictions over REST, with request models built from the spec.

An invalid field gets 422 naming the field and its allowed range or categories; before any champion exists,
predictions answer 503 saying so, while the model and spec endpoints keep working. In the dashboard process every
`/api/v1` route needs a role-bound API key (`serving/access_edge.py`: `Authorization: Bearer <key>` or
`X-API-Key: <key>`), else 401; this app itself checks no credential.

The predict routes read and answer raw bytes (msgspec both ways) rather than through FastAPI's body and
response models: a single prediction then costs little more than the HTTP request that carries it. Their
OpenAPI schema still comes from the spec-built request models.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from fastapi_offline import FastAPIOffline  # /docs from packaged Swagger UI assets, no CDN
from prometheus_client import CONTENT_TYPE_LATEST

from health_mlops.monitoring import ServingMetrics
from health_mlops.serving.answers import BatchAnswer, ModelAnswer, PredictAnswer, answers, install_openapi
from health_mlops.serving.model import ChampionWatcher
from health_mlops.serving.predictor import NoChampion, Predictor
from health_mlops.serving.requests import InvalidRequest
from health_mlops.spec import DatasetSpec
from health_mlops.web.errors import install_validation_handler


def feature_view(spec: DatasetSpec) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": f.type, "unit": f.unit, "min": f.min, "max": f.max,
             "categories": list(f.categories) if f.categories else None, "source": f.source.value,
             "description": f.description} for f in spec.features]


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(msgspec.json.encode(content), status_code=status_code,
                    media_type="application/json")


def _is_json(request: Request) -> bool:
    """Whether the body is declared JSON. Required: a form or text body parsed as JSON by accident is a
    client bug, and a browser can send those cross-site without a preflight."""
    media_type, _, _ = request.headers.get("content-type", "").partition(";")
    return media_type.strip().lower() == "application/json"


NOT_JSON = {"detail": "send the body as JSON, with the header Content-Type: application/json"}


_PREDICT_ERRORS = (401, 413, 415, 422, 503)


def _request_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def create_serving_app(spec: DatasetSpec, watcher: ChampionWatcher, metrics: ServingMetrics | None = None,
                       *, predictor: Predictor | None = None) -> FastAPI:
    predictor = predictor or Predictor(spec, watcher, metrics or ServingMetrics())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        with suppress(Exception):  # no registry yet is fine: predictions say 503 until a champion exists
            watcher.refresh()
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()

    app = FastAPIOffline(title="Health MLOps serving", version="1", redoc_url=None, lifespan=lifespan)
    install_validation_handler(app)

    def refuse(endpoint: str, error: InvalidRequest) -> RequestValidationError:
        rows = {e["loc"][2] for e in error.errors if e["loc"][:2] == ["body", "rows"] and len(e["loc"]) > 2}
        predictor.count_invalid(endpoint, len(rows) or 1)
        return RequestValidationError(error.errors)

    @app.exception_handler(NoChampion)
    async def no_champion(_: Request, error: NoChampion) -> Response:
        return _json({"detail": str(error)}, 503)

    row_schema, batch_schema = predictor.request_schemas()

    explain_parameter = {"name": "explain", "in": "query", "required": False, "schema": {"type": "boolean"},
                         "description": "add the features that contributed most to this prediction"}

    @app.post("/api/v1/predict", openapi_extra={**_request_body(row_schema), "parameters": [explain_parameter],
                                                **answers(PredictAnswer, *_PREDICT_ERRORS)})
    async def predict(request: Request) -> Response:
        """One patient: a flat object of feature → value. For a binary task the prediction is the event
        probability, and `class` is 1 if it is at or above the model's decision `threshold`. `?explain=true` adds
        the features that contributed most; `?hospital=H` answers the risk as hospital H recalibrated the model
        on its own patients, flagged at its own threshold."""
        # The query is read by hand: a declared query parameter costs every prediction ~20 % of throughput.
        explain = request.query_params.get("explain", "false").lower() in ("true", "1", "yes")
        hospital = request.query_params.get("hospital")
        started = time.perf_counter()
        if not _is_json(request):
            predictor.count("predict", "invalid")
            return _json(NOT_JSON, 415)
        try:
            matrix = predictor.decode_one(await request.body())
            model, prediction = predictor.predict("predict", matrix, started, hospital)
        except InvalidRequest as error:
            raise refuse("predict", error) from None
        answer: dict[str, Any] = {"prediction": float(prediction[0]), "model_version": model.version,
                                  "task": spec.task, "target": spec.target.name,
                                  "outside_training_range": model.outside_training_range(matrix)[0]}
        threshold = model.threshold_for(hospital)
        if hospital is not None:
            answer["hospital"] = hospital
        if threshold is not None:  # the decision beside the probability, at the threshold stored with it
            answer["class"] = int(prediction[0] >= threshold)
            answer["threshold"] = threshold
        if explain:
            answer["contributions"] = predictor.explain(model, matrix)
        return _json(answer)

    @app.post("/api/v1/predict/batch", openapi_extra={**_request_body(batch_schema),
                                                      **answers(BatchAnswer, *_PREDICT_ERRORS)})
    async def predict_batch(request: Request) -> Response:
        """Many patients: `{"rows": [...]}`; predictions come back in the same order."""
        started = time.perf_counter()
        if not _is_json(request):
            predictor.count("batch", "invalid")
            return _json(NOT_JSON, 415)
        body = await request.body()
        # A large batch takes a few hundred milliseconds: in a worker thread, single predictions keep being
        # answered meanwhile instead of waiting for the whole batch.
        hospital = request.query_params.get("hospital")
        try:
            matrix = await run_in_threadpool(predictor.decode_batch, body)
            model, predictions = await run_in_threadpool(predictor.predict, "batch", matrix, started, hospital)
        except InvalidRequest as error:
            raise refuse("batch", error) from None
        answer = {"predictions": predictions.tolist(), "model_version": model.version, "task": spec.task,
                  "target": spec.target.name,
                  "outside_training_range": await run_in_threadpool(model.outside_training_range, matrix)}
        threshold = model.threshold_for(hospital)
        if hospital is not None:
            answer["hospital"] = hospital
        if threshold is not None:
            answer.update(classes=model.classes(predictions, threshold), threshold=threshold)
        return _json(answer)

    @app.post("/api/v1/noop", include_in_schema=False)
    async def noop(request: Request) -> Response:
        """The predict route's twin without the prediction: reads the body, answers a fixed object. The serving
        benchmark measures predict against it to see what the model and validation cost."""
        if not _is_json(request):
            return _json(NOT_JSON, 415)
        await request.body()
        return _json({"prediction": 0.0, "model_version": 0})

    @app.get("/api/v1/model", openapi_extra=answers(ModelAnswer, 401))
    async def model_info(request: Request) -> Response:
        model = predictor.current
        described = model.describe() if model else {"version": None, "metrics": {}, "federation_run": None}
        return _json({**described, "task": spec.task, "target": spec.target.name,
                      "spec": {"name": spec.name, "features": feature_view(spec)}})

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> Response:
        # Serving without a champion is a normal state (the UI works, predict says 503); a watcher that died or
        # cannot read the registry is not: this replica would never see a new champion.
        problem = watcher.problem()
        if problem:
            return PlainTextResponse(f"not ready: {problem}", status_code=503)
        return PlainTextResponse("ready")

    prometheus_text = {"description": "Prometheus text exposition",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}

    @app.get("/metrics", openapi_extra={"responses": {"200": prometheus_text}})
    async def metrics_endpoint() -> Response:
        return Response(predictor.exposition(), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app, [row_schema, batch_schema])
    return app
