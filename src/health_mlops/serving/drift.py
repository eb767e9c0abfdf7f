"""Input drift: how far the patients being scored have moved from the population the model was trained on.

Each feature gets a population stability index (PSI) over the last `window` rows scored, against the
champion's training population: PSI = sum over bins of (served - expected) * ln(served / expected), with the
shares of rows in each bin. The bins of a numeric feature are about ten of equal training mass, cut from the
histogram the hospitals summed on the spec's grid; categories are their own bins. A model exported without
histograms falls back to ten bins of a normal distribution with the training mean and standard deviation.
The usual reading: below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a shift worth acting on (the
FeatureDrift alert's threshold).
"""

from __future__ import annotations

from collections import deque
from statistics import NormalDist

import numpy as np

from health_mlops.data.preprocess import histogram_edges
from health_mlops.ml.onnx import FeatureReference
from health_mlops.spec import DatasetSpec, Feature

MIN_ROWS = 100  # fewer rows say more about the patients than about drift
BINS = 10
SIGNIFICANT_PSI = 0.25
_FLOOR = 1e-4  # an empty bin's share, so that the logarithm stays finite


def population_stability(served: np.ndarray, expected: np.ndarray) -> float:
    served = np.maximum(served, _FLOOR)
    expected = np.maximum(expected, _FLOOR)
    return float(((served - expected) * np.log(served / expected)).sum())


def equal_mass_bins(edges: np.ndarray, counts: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray]:
    """Cut points (inner edges) of about `bins` bins of equal mass, merged from a fine histogram, and each
    bin's expected share."""
    total = counts.sum()
    if total == 0:
        return np.array([]), np.array([1.0])
    cumulative = np.cumsum(counts) / total
    cuts = np.unique(np.searchsorted(cumulative, np.arange(1, bins) / bins, side="left"))
    cuts = cuts[cuts < len(counts) - 1]
    inner = edges[cuts + 1]
    shares = np.diff(np.concatenate([[0.0], cumulative[cuts], [1.0]]))
    return inner, shares


def reference_bins(feature: Feature, reference: FeatureReference) -> tuple[np.ndarray, np.ndarray]:
    edges = histogram_edges(feature)
    if edges is not None and feature.name in reference.histograms:
        return equal_mass_bins(edges, np.asarray(reference.histograms[feature.name], dtype=np.float64))
    normal = NormalDist(reference.mean[feature.name], reference.scale[feature.name] or 1.0)
    return np.array([normal.inv_cdf(k / BINS) for k in range(1, BINS)]), np.full(BINS, 1 / BINS)


class InputDrift:
    def __init__(self, spec: DatasetSpec, reference: FeatureReference, window: int = 2000) -> None:
        self.spec = spec
        self.window = window
        self._bins = {f.name: reference_bins(f, reference) for f in spec.features if f.type == "numeric"}
        self._frequencies = {name: np.asarray(shares) for name, shares in reference.frequencies.items()}
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
        """Each feature's PSI over the window's measured values; none until a feature has MIN_ROWS of them."""
        if len(self._rows) < MIN_ROWS:
            return {}
        rows = np.stack(list(self._rows)).astype(np.float64)
        found: dict[str, float] = {}
        for j, feature in enumerate(self.spec.features):
            values = rows[:, j][~np.isnan(rows[:, j])]  # a missing value is no evidence of drift either way
            if len(values) < MIN_ROWS:
                continue
            if feature.type == "numeric":
                inner, expected = self._bins[feature.name]
                served = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(expected))
            else:
                expected = self._frequencies[feature.name]
                served = np.bincount(values.astype(np.int64), minlength=len(expected))
            found[feature.name] = population_stability(served / len(values), expected)
        return found
