"""What the serving API answers, as models for its OpenAPI document (the routes write their JSON directly: a
response model would cost every prediction its validation), and the document itself, complete and valid: every
`$ref` resolves, every route says what it answers, so generated clients work."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

REF_TEMPLATE = "#/components/schemas/{model}"


class ContributionAnswer(BaseModel):
    feature: str
    value: float | str | None = Field(description="the patient's value (a category as its name; null: not measured)")
    typical: float | str = Field(description="the training population's typical value it was compared with")
    contribution: float = Field(description="the prediction minus the prediction with this feature at its typical "
                                            "value")


class OutsideRangeAnswer(BaseModel):
    feature: str
    value: float = Field(description="the value sent")
    seen: list[float] = Field(description="[low, high]: what the training rows covered (0.5th to 99.5th "
                                          "percentile); the model scored the value at the nearer edge")


class PredictAnswer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    prediction: float = Field(description="binary tasks: the event probability; regression: the value in the "
                                          "target's unit")
    model_version: int
    task: Literal["binary", "regression"]
    target: str
    class_: int | None = Field(None, alias="class", description="binary tasks: 1 if the prediction is at or above "
                                                                 "the model's decision threshold")
    threshold: float | None = Field(None, description="binary tasks: the decision threshold stored with the model "
                                                      "(with ?hospital=H: that hospital's own)")
    hospital: str | None = Field(None, description="with ?hospital=H: the risk is H's recalibration of the model")
    contributions: list[ContributionAnswer] | None = Field(None, description="with ?explain=true")
    outside_training_range: list[OutsideRangeAnswer] = Field(
        default_factory=list, description="each input beyond what the model was trained on: treat the prediction "
                                          "with caution (empty: every input inside)")


class BatchAnswer(BaseModel):
    predictions: list[float] = Field(description="one per row, in the order of the rows")
    model_version: int
    task: Literal["binary", "regression"]
    target: str
    classes: list[int] | None = Field(None, description="binary tasks: each prediction's decision")
    threshold: float | None = None
    hospital: str | None = Field(None, description="with ?hospital=H: the risks are H's recalibration of the model")
    outside_training_range: list[list[OutsideRangeAnswer]] = Field(
        default_factory=list, description="per row, its inputs beyond what the model was trained on")


class ModelAnswer(BaseModel):
    version: int | None = Field(description="the served version; null before a champion exists")
    metrics: dict[str, float]
    federation_run: str | None
    decision_threshold: float | None = None
    site_calibrations: list[str] = Field(default_factory=list, description="the hospitals whose recalibration "
                                         "of the model ?hospital=H can ask for")
    task: Literal["binary", "regression"]
    target: str
    spec: dict[str, Any] = Field(description="the task's name and features (type, unit, range, categories)")


class ErrorAnswer(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="why: a sentence, or one entry per invalid field with "
                                                            "its location (loc) and message (msg)")


ERRORS = {401: "the API key is missing or wrong", 413: "the body is too large", 415: "the body is not JSON",
          422: "a field is invalid: each one is named with what it allows", 503: "no champion model yet"}


def answers(ok: type[BaseModel], *errors: int) -> dict[str, Any]:
    """`openapi_extra` saying what a route answers: `ok` on 200, `ErrorAnswer` on each of `errors`."""
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {
        "schema": {"$ref": REF_TEMPLATE.format(model=ok.__name__)}}}}}
    for code in errors:
        responses[str(code)] = {"description": ERRORS[code], "content": {"application/json": {
            "schema": {"$ref": REF_TEMPLATE.format(model=ErrorAnswer.__name__)}}}}
    return {"responses": responses}


def install_openapi(app: FastAPI, request_schemas: list[dict[str, Any]]) -> None:
    """Make `app`'s OpenAPI document carry the answer models and the request bodies' definitions as components
    (`request_schemas` are the bodies' JSON schemas: their `$defs` move there, where their `$ref`s point)."""
    definitions: dict[str, Any] = {}
    for schema in request_schemas:
        definitions.update(schema.pop("$defs", {}))

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            built = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = built.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(definitions)
            for model in (PredictAnswer, BatchAnswer, ModelAnswer, ErrorAnswer):
                schema = model.model_json_schema(ref_template=REF_TEMPLATE, by_alias=True)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            app.openapi_schema = built
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
