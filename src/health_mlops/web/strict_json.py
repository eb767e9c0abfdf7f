"""Strict JSON: an undefined number (NaN, infinite) is written as null, which every parser reads; a bare NaN,
which Python's json writes by default, is rejected by strict parsers (JavaScript's JSON.parse among them)."""

from __future__ import annotations

import json
import math
import numbers


def finite(value: object) -> object:
    """`value` with every non-finite float (Python's or numpy's) replaced by None, recursively."""
    if isinstance(value, numbers.Real) and not isinstance(value, int):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def dumps(value: object, **options: object) -> str:
    return json.dumps(finite(value), default=float, allow_nan=False, **options)  # type: ignore[arg-type]
