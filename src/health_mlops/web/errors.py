"""One answer for invalid requests in every service: 422 with each error's field and reason, always JSON, never
the input.

FastAPI's default answer echoes the offending input: a patient's values would travel back (and into any log of
the response), a large invalid body would come back as large, and an input that is not valid JSON on the way
out (an infinite number, NaN) would turn a client's mistake into a 500.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float and non-JSON object replaced by its text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


# What an error says: where (loc: the field, and the row in a batch), what kind, why, and the limit it broke.
_KEPT = ("loc", "type", "msg", "ctx")


def without_input(errors: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in error.items() if k in _KEPT} for error in errors]


def install_validation_handler(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": json_safe(without_input(list(error.errors())))}, status_code=422)
