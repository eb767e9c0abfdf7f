"""Prediction requests: JSON rows of spec features turned into the exported model's input matrix.

Two paths take the same requests. The fast one decodes and validates the body in one pass with msgspec against
structs built from the spec (types, ranges, categories), and a 100,000-row batch costs about a quarter of a
second. If that fails, the spec-built pydantic model, as strict, validates the request again to name every
row, field and allowed value at fault.
"""

# No `from __future__ import annotations`: the request models are built at run time with `create_model`.
import itertools
import operator
from functools import partial
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from health_mlops.data.preprocess import serving_matrix
from health_mlops.errors import HealthMlopsError
from health_mlops.spec import DatasetSpec, Feature

MAX_BATCH_ROWS = 200_000
# A batch with invalid rows is answered with the first ones: enough to fix the request, and the answer and the
# memory it takes stay small however many rows are wrong (a million empty rows would be 15 million errors).
MAX_REPORTED_ROWS = 20
FLOAT32_MAX = float(np.finfo(np.float32).max)


class InvalidRequest(HealthMlopsError):
    """A request that is not what the endpoint takes; `errors` are pydantic-style, each with a `loc`."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"] if errors else "invalid request")
        self.errors = errors


def row_model(spec: DatasetSpec) -> type[BaseModel]:
    """The request model of one row: every spec feature, typed and bounded as the spec says."""
    fields: dict[str, Any] = {}
    for feature in spec.features:
        description = f"{feature.description} ({feature.unit})" if feature.unit else feature.description
        # Strict: a boolean or a string is not a number, and a number is not a category (categories are the
        # spec's text, "0" and "1" included): a client that sends otherwise has a bug we should not guess around.
        if feature.type == "numeric":
            annotation: Any = Annotated[float, Field(ge=feature.min, le=feature.max, allow_inf_nan=False,
                                                     strict=True, description=description)]
        else:
            categories = tuple(feature.categories or ())
            if feature.codes:
                description += f"; also written as {', '.join(sorted(feature.codes))} (in any case)"
            annotation = Annotated[Literal[categories], BeforeValidator(partial(_as_category, feature.spellings())),
                                   Field(description=description)]
        if feature.missing is not None:  # "not measured": null, or one of the spec's codes, as in data files
            annotation = Annotated[annotation | None, BeforeValidator(partial(_code_as_null, feature))]
        fields[feature.name] = (annotation, ...)
    return create_model(f"{spec.name.title().replace('-', '')}Row", __config__=ConfigDict(extra="forbid"),
                        **fields)


def _as_category(spellings: dict[str, str], value: Any) -> Any:
    """A category as the spec writes it, from its text in any case or one of its codes (male for M), as a data
    file's is read (`data.validate`); anything else is left for the type to refuse."""
    return spellings.get(value.strip().lower(), value) if isinstance(value, str) else value


def _code_as_null(feature: Feature, value: Any) -> Any:
    assert feature.missing is not None
    if isinstance(value, bool) or value is None:
        return value
    if feature.type == "numeric":
        codes = {float(c) for c in feature.missing.codes}
        return None if isinstance(value, int | float) and float(value) in codes else value
    return None if isinstance(value, str) and value.strip().lower() in {c.lower() for c in feature.missing.codes} \
        else value


def parse_json(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError) as error:  # deep nesting ("[[[[…") is not JSON we take
        raise InvalidRequest([{"loc": ["body"], "type": "json_invalid",
                               "msg": f"the body is not valid JSON: {error}"}]) from None


def row_struct(spec: DatasetSpec) -> type[msgspec.Struct]:
    """The msgspec twin of `row_model`, strict: numbers as numbers, categories as their text."""
    fields: list[tuple[str, Any]] = []
    for feature in spec.features:
        if feature.type == "numeric":
            low = -FLOAT32_MAX if feature.min is None else feature.min  # bounds also keep out ±inf (1e400)
            high = FLOAT32_MAX if feature.max is None else feature.max
            annotation: Any = Annotated[float, msgspec.Meta(ge=low, le=high)]
        else:
            annotation = Literal[tuple(feature.categories or ())]
        # null is "not measured" where the spec allows it; its codes (-9) take the validating path
        fields.append((feature.name, annotation | None if feature.missing is not None else annotation))
    return msgspec.defstruct("Row", fields, forbid_unknown_fields=True)


class RowEncoder:
    """Validates rows of one spec and encodes them as the model's float32 input (categories as indices)."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.row_model = row_model(spec)
        self.batch_model = create_model(
            "Batch", __config__=ConfigDict(extra="forbid"),
            rows=(Annotated[list[self.row_model], Field(min_length=1, max_length=MAX_BATCH_ROWS)], ...))  # type: ignore[arg-type,name-defined]
        row = row_struct(spec)
        rows = Annotated[list[row], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ROWS)]  # type: ignore[valid-type]
        batch = msgspec.defstruct("Batch", [("rows", rows)], forbid_unknown_fields=True)
        self._one = msgspec.json.Decoder(row)
        self._many: msgspec.json.Decoder[Any] = msgspec.json.Decoder(batch)
        numeric = [f.name for f in spec.features if f.type == "numeric"]
        self._numeric_columns = [j for j, f in enumerate(spec.features) if f.type == "numeric"]
        self._numeric_values = operator.attrgetter(*numeric) if len(numeric) > 1 else (
            lambda r: (getattr(r, numeric[0]),) if numeric else ())
        self._categorical = [(j, operator.attrgetter(f.name),
                              {None: np.nan, **{c: float(i) for i, c in enumerate(f.categories or ())}})
                             for j, f in enumerate(spec.features) if f.type != "numeric"]

    def strict_row(self, body: bytes) -> Any | None:
        """A single-row body decoded by the fast path, or None if it needs the validating path."""
        try:
            return self._one.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            return None

    def one(self, body: bytes) -> np.ndarray:
        """The (1 × features) input of a single-row request body, or InvalidRequest naming the field."""
        row = self.strict_row(body)
        if row is None:
            return self._validated(self.row_model, parse_json(body), lambda r: [r])
        # One row is built in plain Python and handed to numpy once: per-column numpy calls cost more here.
        values: list[float | None] = [0.0] * len(self.spec.features)  # numpy reads None (not measured) as NaN
        for j, value in zip(self._numeric_columns, self._numeric_values(row), strict=True):
            values[j] = value
        for j, value_of, index in self._categorical:
            values[j] = index[value_of(row)]
        return np.array([values], dtype=np.float32)

    def batch(self, body: bytes) -> np.ndarray:
        """The input of a `{"rows": [...]}` body, or InvalidRequest naming the first bad rows and their fields."""
        try:
            return self.matrix(self._many.decode(body).rows)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            value = parse_json(body)
        rows = value.get("rows") if isinstance(value, dict) else None
        if not isinstance(rows, list) or not rows or set(value) != {"rows"}:  # the envelope is wrong: say how
            return self._validated(self.batch_model, {**value, "rows": rows[:1]} if isinstance(rows, list) else value,
                                   lambda b: b.rows)
        if len(rows) > MAX_BATCH_ROWS:
            raise InvalidRequest([{"loc": ["body", "rows"], "type": "too_long",
                                   "msg": f"a batch may hold at most {MAX_BATCH_ROWS} rows; this one has {len(rows)}"}])
        return self.matrix_of(self._validated_rows(rows))

    def _validated_rows(self, rows: list[Any]) -> list[BaseModel]:
        """Each row validated on its own, stopping after `MAX_REPORTED_ROWS` invalid ones."""
        valid: list[BaseModel] = []
        errors: list[dict[str, Any]] = []
        invalid_rows = 0
        for index, row in enumerate(rows):
            try:
                valid.append(self.row_model.model_validate(row))
            except ValidationError as error:
                errors += [{**e, "loc": ["body", "rows", index, *e["loc"]]} for e in error.errors()]
                invalid_rows += 1
                if invalid_rows == MAX_REPORTED_ROWS:
                    errors.append({"loc": ["body", "rows"], "type": "too_many_invalid_rows",
                                   "msg": f"stopped after the first {MAX_REPORTED_ROWS} invalid rows"})
                    break
        if errors:
            raise InvalidRequest(errors)
        return valid

    def matrix(self, rows: list[Any]) -> np.ndarray:
        """The input of rows decoded by the fast path."""
        matrix = np.empty((len(rows), len(self.spec.features)), dtype=np.float32)
        if self._numeric_columns:
            values = np.fromiter(itertools.chain.from_iterable(map(self._numeric_values, rows)), dtype=np.float32,
                                 count=len(rows) * len(self._numeric_columns))  # None (not measured) becomes NaN
            matrix[:, self._numeric_columns] = values.reshape(len(rows), -1)
        for j, value_of, index in self._categorical:
            matrix[:, j] = np.fromiter(map(index.__getitem__, map(value_of, rows)), dtype=np.float32, count=len(rows))
        return matrix

    def matrix_of(self, rows: list[BaseModel]) -> np.ndarray:
        """The input of rows the request model has validated (the same encoding as for data files)."""
        return serving_matrix(pd.DataFrame([row.model_dump() for row in rows]), self.spec)

    def _validated(self, model: type[BaseModel], value: Any, rows_of: Any) -> np.ndarray:
        try:
            return self.matrix_of(rows_of(model.model_validate(value)))
        except ValidationError as error:
            raise InvalidRequest([{**e, "loc": ["body", *e["loc"]]} for e in error.errors()]) from None
