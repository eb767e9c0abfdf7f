"""Preprocessing defined only by per-column counts, sums and sums of squares.

Those three numbers can be computed at each hospital and added up centrally, so every hospital standardises
identically without any row leaving it. Categorical columns are one-hot encoded from the spec's categories,
never from the data, so every hospital produces the same columns in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from health_mlops.spec import DatasetSpec, Feature

# A column whose variance is below this is left unscaled (e.g. a category no hospital has).
_MIN_VARIANCE = 1e-12


def encoded_columns(spec: DatasetSpec) -> list[str]:
    """Names of the model's input columns: numeric features as they are, one column per category."""
    names: list[str] = []
    for feature in spec.features:
        if feature.type == "numeric":
            names.append(feature.name)
        else:
            names.extend(f"{feature.name}={c}" for c in feature.categories or ())
    return names


def encode_features(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """The (rows × encoded columns) float64 matrix of validated rows."""
    blocks: list[np.ndarray] = []
    for feature in spec.features:
        values = frame[feature.name].to_numpy()
        if feature.type == "numeric":
            blocks.append(values.astype(np.float64)[:, None])
        else:
            categories = np.asarray(feature.categories, dtype=object)
            blocks.append((values[:, None] == categories[None, :]).astype(np.float64))
    return np.hstack(blocks) if blocks else np.zeros((len(frame), 0))


def serving_matrix(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """The exported model's input: one float32 column per spec feature, categories as their index in the spec
    (the ONNX graph one-hot encodes and standardises them itself)."""
    columns = []
    for feature in spec.features:
        values = frame[feature.name].to_numpy()
        if feature.type == "numeric":
            columns.append(values.astype(np.float32))
        else:
            index = {category: i for i, category in enumerate(feature.categories or ())}
            columns.append(np.fromiter((index[v] for v in values), dtype=np.float32, count=len(values)))
    return np.column_stack(columns) if columns else np.zeros((len(frame), 0), dtype=np.float32)


def encode_target(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """The target as float64: 0/1 for binary tasks, the value for regression."""
    return frame[spec.target.name].astype(np.float64).to_numpy()


@dataclass(frozen=True)
class ColumnStats:
    """Count, sum and sum of squares of each encoded column and of the target: all preprocessing needs."""

    count: int
    sums: np.ndarray
    sums_of_squares: np.ndarray
    target_sum: float
    target_sum_of_squares: float

    @classmethod
    def of(cls, features: np.ndarray, target: np.ndarray) -> ColumnStats:
        return cls(count=len(features), sums=features.sum(axis=0), sums_of_squares=(features**2).sum(axis=0),
                   target_sum=float(target.sum()), target_sum_of_squares=float((target**2).sum()))

    def __add__(self, other: ColumnStats) -> ColumnStats:
        return ColumnStats(self.count + other.count, self.sums + other.sums,
                           self.sums_of_squares + other.sums_of_squares,
                           self.target_sum + other.target_sum,
                           self.target_sum_of_squares + other.target_sum_of_squares)

    def to_dict(self) -> dict[str, object]:
        return {"count": self.count, "sums": self.sums.tolist(), "sums_of_squares": self.sums_of_squares.tolist(),
                "target_sum": self.target_sum, "target_sum_of_squares": self.target_sum_of_squares}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ColumnStats:
        return cls(count=int(data["count"]), sums=np.asarray(data["sums"], dtype=np.float64),
                   sums_of_squares=np.asarray(data["sums_of_squares"], dtype=np.float64),
                   target_sum=float(data["target_sum"]), target_sum_of_squares=float(data["target_sum_of_squares"]))


def sum_stats(parts: list[ColumnStats]) -> ColumnStats:
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def mean_and_scale(count: int | np.ndarray, sums: np.ndarray, sums_of_squares: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation from sums; `count` may differ per column (suppressed cells)."""
    mean = sums / np.maximum(count, 1)
    variance = np.maximum(sums_of_squares / np.maximum(count, 1) - mean**2, 0.0)
    scale = np.where(variance > _MIN_VARIANCE, np.sqrt(variance), 1.0)
    return mean, scale


@dataclass(frozen=True)
class Preprocessor:
    """Standardisation of inputs (and of the target for regression), fixed before training starts."""

    spec: DatasetSpec
    mean: np.ndarray
    scale: np.ndarray
    target_mean: float
    target_scale: float

    @classmethod
    def from_stats(cls, spec: DatasetSpec, stats: ColumnStats) -> Preprocessor:
        if stats.count == 0:
            raise ValueError("cannot standardise from zero rows")
        mean, scale = mean_and_scale(stats.count, stats.sums, stats.sums_of_squares)
        if spec.task == "binary":  # a probability needs no scaling
            return cls(spec, mean, scale, 0.0, 1.0)
        t_mean, t_scale = mean_and_scale(stats.count, np.array([stats.target_sum]),
                                          np.array([stats.target_sum_of_squares]))
        return cls(spec, mean, scale, float(t_mean[0]), float(t_scale[0]))

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """Standardised float32 model inputs."""
        return ((encode_features(frame, self.spec) - self.mean) / self.scale).astype(np.float32)

    def target(self, frame: pd.DataFrame) -> np.ndarray:
        """The training target: 0/1 for binary tasks, standardised for regression (float32)."""
        return ((encode_target(frame, self.spec) - self.target_mean) / self.target_scale).astype(np.float32)

    def restore_target(self, predictions: np.ndarray) -> np.ndarray:
        """Back from the model's scale to the target's unit (identity for binary probabilities)."""
        return predictions * self.target_scale + self.target_mean


def stats_of_frame(frame: pd.DataFrame, spec: DatasetSpec) -> ColumnStats:
    return ColumnStats.of(encode_features(frame, spec), encode_target(frame, spec))


# Each hospital counts its rows of every bounded numeric feature on the same fine grid over the spec's range;
# summed centrally, the counts describe the training population's distribution (the drift reference) without
# any row leaving a hospital.
HISTOGRAM_BINS = 100


def histogram_edges(feature: Feature) -> np.ndarray | None:
    """The grid's bin edges for a numeric feature; None if the spec gives it no range."""
    if feature.type != "numeric" or feature.min is None or feature.max is None:
        return None
    return np.linspace(feature.min, feature.max, HISTOGRAM_BINS + 1)


def feature_histograms(frame: pd.DataFrame, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Row counts per grid bin of each bounded numeric feature."""
    found = {}
    for feature in spec.features:
        edges = histogram_edges(feature)
        if edges is not None:
            found[feature.name] = np.histogram(frame[feature.name].to_numpy(dtype=np.float64), bins=edges)[0]
    return found
