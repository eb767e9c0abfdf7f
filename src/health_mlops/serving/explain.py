"""Why the model gave a patient this risk: each feature's contribution, measured against a typical patient.

A feature's contribution is how much the prediction falls (or rises) when that one feature is set to the
typical value of the training population (its mean, or its most common category) with everything else kept.
It needs one model call for all features, works for any model, and reads in the prediction's own unit: a
contribution of +0.08 means this feature's value adds 8 percentage points of risk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from health_mlops.spec import DatasetSpec


class Predictor(Protocol):
    def predict(self, features: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Contribution:
    feature: str
    value: float | str  # the patient's value (a category as its name)
    typical: float | str  # the reference it was compared with
    contribution: float  # prediction minus the prediction with this feature at its typical value


def contributions(model: Predictor, spec: DatasetSpec, row: np.ndarray, typical: list[float],
                  top: int | None = None) -> list[Contribution]:
    """The features of one encoded row (1 × features), largest absolute contribution first."""
    row = np.asarray(row, dtype=np.float32).reshape(1, -1)
    variants = np.repeat(row, len(spec.features) + 1, axis=0)
    for j in range(len(spec.features)):
        variants[j + 1, j] = typical[j]
    predictions = model.predict(variants).astype(np.float64)
    found = []
    for j, feature in enumerate(spec.features):
        value, reference = float(row[0, j]), float(typical[j])
        shown: str | float
        typical_shown: str | float
        if feature.type != "numeric":
            categories = list(feature.categories or ())
            shown, typical_shown = categories[int(value)], categories[int(reference)]
        else:
            shown, typical_shown = value, reference
        found.append(Contribution(feature.name, shown, typical_shown, float(predictions[0] - predictions[j + 1])))
    found.sort(key=lambda c: abs(c.contribution), reverse=True)
    return found[:top] if top else found
