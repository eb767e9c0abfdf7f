"""Input drift: how far the patients being scored have moved from the population the model was trained on.

Per feature, over the last `window` rows served: numeric features score the shift of their mean in units of
the training standard deviation, |mean_served - mean_train| / sd_train; categorical features score the total
variation distance between served and training category shares (0 = same mix, 1 = disjoint). A score above
about 0.5 for a numeric feature or 0.2 for a categorical one is worth a look (the alert rules use these).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from health_mlops.ml.onnx import FeatureReference
from health_mlops.spec import DatasetSpec


MIN_ROWS = 100  # fewer rows say more about the patients than about drift


class InputDrift:
    def __init__(self, spec: DatasetSpec, reference: FeatureReference, window: int = 2000) -> None:
        self.spec = spec
        self.reference = reference
        self.window = window
        # Rows as references to their arrays: remembering a single prediction's row costs one append (a
        # deque's append and extend are atomic, so concurrent requests need no lock).
        self._rows: deque[np.ndarray] = deque(maxlen=window)

    def observe(self, matrix: np.ndarray) -> None:
        """Remember the newest rows (a batch larger than the window keeps its last `window` rows)."""
        self._rows.extend(matrix[-self.window:].copy())  # a copy: views would keep a whole large batch alive

    @property
    def rows_seen(self) -> int:
        return len(self._rows)

    def scores(self) -> dict[str, float]:
        """Each feature's drift score over the window; empty until MIN_ROWS rows have been scored."""
        if len(self._rows) < MIN_ROWS:
            return {}
        rows = np.stack(list(self._rows)).astype(np.float64)
        found: dict[str, float] = {}
        for j, feature in enumerate(self.spec.features):
            if feature.type == "numeric":
                scale = self.reference.scale[feature.name] or 1.0
                found[feature.name] = abs(float(rows[:, j].mean()) - self.reference.mean[feature.name]) / scale
            else:
                expected = np.asarray(self.reference.frequencies[feature.name])
                served = np.bincount(rows[:, j].astype(np.int64), minlength=len(expected)) / len(rows)
                found[feature.name] = 0.5 * float(np.abs(served - expected).sum())
        return found
