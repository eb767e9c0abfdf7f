"""Preprocessing defined only by per-column counts, sums and sums of squares.

Those three numbers can be computed at each hospital and added up centrally, so every hospital standardises
identically without any row leaving it. Categorical columns are one-hot encoded from the spec's categories,
never from the data, so every hospital produces the same columns in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from health_mlops.spec import DatasetSpec, Feature

# A column whose variance is below this is left unscaled (e.g. a category no hospital has).
_MIN_VARIANCE = 1e-12
# The name of a missingness indicator column is the feature's name with this suffix.
MISSING_SUFFIX = ":missing"


def _columns(spec: DatasetSpec) -> list[tuple[str, str]]:
    """The model's input columns in order, each (the feature it belongs to, its name): every feature's value
    columns (a numeric feature's parts, `numeric_parts`; a categorical feature's one per category), then one
    missingness indicator per feature whose spec asks for one."""
    owned: list[tuple[str, str]] = []
    for feature in spec.features:
        names = ([name for name, _ in numeric_parts(feature)] if feature.type == "numeric"
                 else [f"{feature.name}={c}" for c in feature.categories or ()])
        owned.extend((feature.name, name) for name in names)
    owned.extend((f.name, f"{f.name}{MISSING_SUFFIX}") for f in spec.features if f.has_indicator)
    return owned


def encoded_columns(spec: DatasetSpec) -> list[str]:
    """Names of the model's input columns (`_columns`)."""
    return [name for _, name in _columns(spec)]


# A numeric column's value from the feature's: clip(x + shift, low, high).
NumericPart = tuple[float, float, float]


def numeric_parts(feature: Feature) -> list[tuple[str, NumericPart]]:
    """A numeric feature's encoded columns, each (name, (shift, low, high)). The value itself, or, for a
    direction from a value c on, two parts that add up to it: above c, min(x, c), free, and max(x - c, 0), the
    part the direction constrains; below c, max(x, c), free, and min(x - c, 0), constrained. Each part rises
    with x (so the constrained one takes the direction's sign, and the clamp to the training range commutes with
    the split)."""
    where = feature.direction_from
    if where is None:
        return [(feature.name, (0.0, -np.inf, np.inf))]
    c = where.value
    if where.side == "above":
        return [(feature.name, (0.0, -np.inf, c)), (f"{feature.name}>{c:g}", (-c, 0.0, np.inf))]
    return [(feature.name, (0.0, c, np.inf)), (f"{feature.name}<{c:g}", (-c, -np.inf, 0.0))]


def numeric_columns(feature: Feature, values: np.ndarray) -> np.ndarray:
    """(rows × parts) the feature's encoded columns of raw values (NaN stays NaN)."""
    return np.column_stack([np.clip(values + shift, low, high) for _, (shift, low, high) in numeric_parts(feature)])


def value_width(feature: Feature) -> int:
    """How many encoded columns hold a feature's value: its parts, or one per category."""
    return len(numeric_parts(feature)) if feature.type == "numeric" else len(feature.categories or ())


def feature_columns(spec: DatasetSpec) -> dict[str, list[int]]:
    """Each feature's encoded columns (its value or categories, and its indicator if any)."""
    columns: dict[str, list[int]] = {}
    for j, (feature, _) in enumerate(_columns(spec)):
        columns.setdefault(feature, []).append(j)
    return columns


def encode_features(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """The (rows × encoded columns) float64 matrix of validated rows. A missing value (allowed by the spec) is
    NaN in its feature's columns, all of a categorical feature's, until the `Preprocessor` fills it in."""
    blocks: list[np.ndarray] = []
    indicators: list[np.ndarray] = []
    for feature in spec.features:
        values = frame[feature.name].to_numpy()
        if feature.type == "numeric":
            block = numeric_columns(feature, values.astype(np.float64))
        else:
            categories = np.asarray(feature.categories, dtype=object)
            block = (values[:, None] == categories[None, :]).astype(np.float64)
            block[pd.isna(values)] = np.nan
        blocks.append(block)
        if feature.has_indicator:
            indicators.append(np.isnan(block[:, :1]).astype(np.float64))
    blocks += indicators
    return np.hstack(blocks) if blocks else np.zeros((len(frame), 0))


def serving_matrix(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """The exported model's input: one float32 column per spec feature, categories as their index in the spec,
    a missing value as NaN (the ONNX graph fills it in, one-hot encodes and standardises itself)."""
    columns = []
    for feature in spec.features:
        values = frame[feature.name].to_numpy()
        if feature.type == "numeric":
            columns.append(values.astype(np.float32))
        else:
            index = {category: float(i) for i, category in enumerate(feature.categories or ())}
            columns.append(np.fromiter((np.nan if pd.isna(v) else index[v] for v in values), dtype=np.float32,
                                       count=len(values)))
    return np.column_stack(columns) if columns else np.zeros((len(frame), 0), dtype=np.float32)


def encode_target(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """The target as float64: 0/1 for binary tasks, the value for regression."""
    return frame[spec.target.name].astype(np.float64).to_numpy()


@dataclass(frozen=True)
class ColumnStats:
    """Count, observed (not missing) count, sum and sum of squares of each encoded column over its observed
    values, and the target's sums: all preprocessing needs, imputation included."""

    count: int
    observed: np.ndarray
    sums: np.ndarray
    sums_of_squares: np.ndarray
    target_sum: float
    target_sum_of_squares: float

    @classmethod
    def of(cls, features: np.ndarray, target: np.ndarray) -> ColumnStats:
        return cls(count=len(features), observed=(~np.isnan(features)).sum(axis=0).astype(np.float64),
                   sums=np.nansum(features, axis=0), sums_of_squares=np.nansum(features**2, axis=0),
                   target_sum=float(target.sum()), target_sum_of_squares=float((target**2).sum()))


def mean_and_scale(count: int | np.ndarray, sums: np.ndarray, sums_of_squares: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation from sums; `count` may differ per column (suppressed cells)."""
    mean = sums / np.maximum(count, 1)
    variance = np.maximum(sums_of_squares / np.maximum(count, 1) - mean**2, 0.0)
    scale = np.where(variance > _MIN_VARIANCE, np.sqrt(variance), 1.0)
    return mean, scale


def fill_values(spec: DatasetSpec, observed: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """What a missing value becomes, per encoded column: a numeric feature's mean over its observed values, or
    a 1 in the column of a categorical feature's most common category (0 in its others). Indicator columns are
    never missing."""
    fill = np.zeros(len(sums))
    columns = feature_columns(spec)
    for feature in spec.features:
        own = columns[feature.name][:value_width(feature)]
        if feature.type == "numeric":
            middle = ((feature.min or 0.0) + (feature.max or 0.0)) / 2  # no hospital measured it: any value does
            # The parts of a value add up to it, and so do their sums: the fill is the parts of the mean value
            # (as the exported model fills the value, then splits it).
            mean = float(sums[own].sum() / observed[own[0]]) if observed[own[0]] > 0 else middle
            fill[own] = numeric_columns(feature, np.array([mean]))[0]
        else:
            fill[own[int(np.argmax(np.nan_to_num(sums[own])))]] = 1.0
    return fill


def standardisation(counts: int | np.ndarray, observed: np.ndarray, sums: np.ndarray, sums_of_squares: np.ndarray,
                    fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale of each column after its missing values take `fill`, exactly, from the observed sums."""
    missing = counts - observed
    return mean_and_scale(counts, sums + missing * fill, sums_of_squares + missing * fill**2)


class GlobalPreprocessing(BaseModel):
    """A run's preprocessing, reduced from every hospital's round-0 counts (`fl.stats.reduce_stats`): what each
    hospital standardises with, what the exported model carries inside, and the run's decision threshold. It is
    sent with every task and stored with the run, as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    count: int = Field(ge=0)  # the training rows it was computed from, over the hospitals
    mean: list[float]  # per encoded column
    scale: list[float]
    fill: list[float] | None = None  # per encoded column, a missing value's fill; older runs: nothing is missing
    target_mean: float = 0.0  # regression: the target's standardisation (binary: the identity)
    target_scale: float = 1.0
    histograms: dict[str, list[int]] = {}  # numeric feature -> training rows per bin of the spec's grid
    threshold: float | None = None  # binary tasks: the risk from which a patient is flagged

    @property
    def decision_threshold(self) -> float:
        """The run's decision threshold (runs from before thresholds were chosen flagged risks from 0.5)."""
        return 0.5 if self.threshold is None else self.threshold


@dataclass(frozen=True)
class Preprocessor:
    """Imputation and standardisation of inputs (and of the target for regression), fixed before training."""

    spec: DatasetSpec
    mean: np.ndarray
    scale: np.ndarray
    target_mean: float
    target_scale: float
    fill: np.ndarray  # per encoded column: the value a missing entry takes (see `fill_values`)
    # Numeric feature -> the range its training rows covered (`training_ranges`): an input beyond it is taken at
    # the range's edge, here as in the exported model, so that the model is evaluated as it is served.
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, spec: DatasetSpec, stats: ColumnStats) -> Preprocessor:
        if stats.count == 0:
            raise ValueError("cannot standardise from zero rows")
        fill = fill_values(spec, stats.observed, stats.sums)
        mean, scale = standardisation(stats.count, stats.observed, stats.sums, stats.sums_of_squares, fill)
        if spec.task == "binary":  # a probability needs no scaling
            return cls(spec, mean, scale, 0.0, 1.0, fill)
        t_mean, t_scale = mean_and_scale(stats.count, np.array([stats.target_sum]),
                                          np.array([stats.target_sum_of_squares]))
        return cls(spec, mean, scale, float(t_mean[0]), float(t_scale[0]), fill)

    @classmethod
    def of_run(cls, spec: DatasetSpec, preprocessing: GlobalPreprocessing) -> Preprocessor:
        mean = np.asarray(preprocessing.mean)
        target_mean, target_scale = ((0.0, 1.0) if spec.task == "binary"
                                     else (preprocessing.target_mean, preprocessing.target_scale))
        fill = np.zeros(len(mean)) if preprocessing.fill is None else np.asarray(preprocessing.fill)
        return cls(spec, mean, np.asarray(preprocessing.scale), target_mean, target_scale, fill,
                   training_ranges(spec, preprocessing.histograms))

    def with_ranges_of(self, frame: pd.DataFrame) -> Preprocessor:
        """This preprocessing, with the training ranges of `frame`'s rows (pooled and local training)."""
        return replace(self, ranges=training_ranges(self.spec, {name: counts.tolist() for name, counts in
                                                                 feature_histograms(frame, self.spec).items()}))

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """Imputed, clamped to the training ranges, standardised float32 model inputs."""
        encoded = encode_features(frame, self.spec)
        encoded = np.where(np.isnan(encoded), self.fill, encoded)
        if self.ranges:
            columns = feature_columns(self.spec)
            lows, highs = np.full(len(self.mean), -np.inf), np.full(len(self.mean), np.inf)
            for feature in self.spec.features:
                if feature.name in self.ranges:  # each part of the value clamped where the value's clamp puts it
                    edges = numeric_columns(feature, np.array(self.ranges[feature.name], dtype=np.float64))
                    own = columns[feature.name][:value_width(feature)]
                    lows[own], highs[own] = edges.min(axis=0), edges.max(axis=0)
            encoded = np.clip(encoded, lows.astype(np.float32), highs.astype(np.float32))
        return ((encoded - self.mean) / self.scale).astype(np.float32)

    def target(self, frame: pd.DataFrame) -> np.ndarray:
        """The training target: 0/1 for binary tasks, standardised for regression (float32)."""
        return ((encode_target(frame, self.spec) - self.target_mean) / self.target_scale).astype(np.float32)

    def restore_target(self, predictions: np.ndarray) -> np.ndarray:
        """Back from the model's scale to the target's unit (identity for binary probabilities)."""
        return predictions * self.target_scale + self.target_mean


def serving_fill(spec: DatasetSpec, fill: np.ndarray) -> list[float]:
    """`fill` as the exported model's input takes it: per spec feature, a value or a category's index."""
    columns = feature_columns(spec)
    values = []
    for feature in spec.features:
        own = fill[columns[feature.name][:value_width(feature)]]
        values.append(float(own.sum()) if feature.type == "numeric" else float(np.argmax(own)))
    return values


def imputation(spec: DatasetSpec, fill: np.ndarray) -> dict[str, float | str]:
    """What each feature the spec allows to be missing is filled in with: a value, or a category."""
    return {f.name: value if f.type == "numeric" else (f.categories or ())[int(value)]
            for f, value in zip(spec.features, serving_fill(spec, fill), strict=True) if f.missing is not None}


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


# The share of training rows left outside a feature's training range at each end.
RANGE_TAIL = 0.005


def training_ranges(spec: DatasetSpec, histograms: Mapping[str, Sequence[int]]) -> dict[str, tuple[float, float]]:
    """Each numeric feature's range the training rows covered, from the run's histograms (federated: summed from
    the hospitals' round-0 counts, no row leaves a hospital): from the lower edge of the grid bin holding the
    0.5th percentile to the upper edge of the bin holding the 99.5th. Features without a histogram have none."""
    ranges = {}
    for feature in spec.features:
        edges, counts = histogram_edges(feature), histograms.get(feature.name)
        if edges is None or counts is None or sum(counts) <= 0:
            continue
        cumulative = np.cumsum(np.asarray(counts, dtype=np.float64)) / float(sum(counts))
        low = int(np.searchsorted(cumulative, RANGE_TAIL, side="right"))
        high = min(int(np.searchsorted(cumulative, 1.0 - RANGE_TAIL, side="left")), len(counts) - 1)
        ranges[feature.name] = (float(edges[low]), float(edges[high + 1]))
    return ranges


def feature_histograms(frame: pd.DataFrame, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Row counts per grid bin of each bounded numeric feature."""
    found = {}
    for feature in spec.features:
        edges = histogram_edges(feature)
        if edges is not None:
            values = frame[feature.name].to_numpy(dtype=np.float64)
            found[feature.name] = np.histogram(values[~np.isnan(values)], bins=edges)[0]
    return found
