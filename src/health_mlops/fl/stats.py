"""Round 0's statistics: what each hospital sends about its rows (counts and sums, small cells suppressed), how the
aggregator reduces them to the run's preprocessing, and which hospitals the run then trains on. No torch here: the
aggregator loads none.

Only aggregates leave: per-column counts, sums and sums of squares, and each bounded numeric feature's histogram on
the spec's grid; a cell describing fewer than `small_cell_threshold` patients is sent as null.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import pandas as pd

from health_mlops.data.preprocess import (GlobalPreprocessing, encoded_columns, feature_columns, feature_histograms,
                                          fill_values, mean_and_scale, standardisation, stats_of_frame)
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.fl.privacy_budget import privacy_refusal
from health_mlops.fl.run_config import RunConfig
from health_mlops.spec import DatasetSpec


def hospital_stats(frame: pd.DataFrame, spec: DatasetSpec, small_cell_threshold: int) -> StatsMetadata:
    """Counts, observed counts, sums and sums of squares per encoded column, and each bounded numeric feature's
    histogram on the spec's grid. A cell describing 1..threshold-1 patients is suppressed (sent as null) so that
    no small group can be singled out: a category's column, a histogram bin, and every column of a feature
    missing for that few patients (its observed count would tell them)."""
    stats = stats_of_frame(frame, spec)
    columns = encoded_columns(spec)
    suppressed = np.zeros(len(columns), dtype=bool)
    for j, name in enumerate(columns):
        if "=" in name and 0 < stats.sums[j] < small_cell_threshold:
            suppressed[j] = True
    for own in feature_columns(spec).values():
        if 0 < stats.count - stats.observed[own[0]] < small_cell_threshold:
            suppressed[own] = True

    def cells(values: np.ndarray) -> list[float | None]:
        return [None if hidden else float(v) for v, hidden in zip(values, suppressed, strict=True)]

    histograms = {name: [None if 0 < c < small_cell_threshold else int(c) for c in counts]
                  for name, counts in feature_histograms(frame, spec).items()}
    return StatsMetadata(count=stats.count,
                         observed=[None if hidden else int(v) for v, hidden in zip(stats.observed, suppressed,
                                                                                   strict=True)],
                         sums=cells(stats.sums), sums_of_squares=cells(stats.sums_of_squares),
                         target_sum=stats.target_sum, target_sum_of_squares=stats.target_sum_of_squares,
                         histograms=histograms)


def suppressed_cells(stats: StatsMetadata) -> dict[str, int]:
    """How many cells a stats result withheld as too small: columns (a null sum: a small category, or each
    column of a feature missing for few patients) and histogram bins (a null count). Derived from what was sent,
    so the node and the aggregator report the same numbers."""
    return {"categories": sum(value is None for value in stats.sums),
            "histogram_bins": sum(count is None for counts in stats.histograms.values() for count in counts)}


def reduce_stats(spec: DatasetSpec, results: list[StatsMetadata]) -> GlobalPreprocessing:
    """Global imputation and standardisation from hospitals' stats, exactly as from the pooled rows; a
    suppressed cell leaves that hospital out of that column."""
    counts = np.array([r.count for r in results], dtype=np.float64)
    sums = np.array([[np.nan if v is None else v for v in r.sums] for r in results], dtype=np.float64)
    squares = np.array([[np.nan if v is None else v for v in r.sums_of_squares] for r in results], dtype=np.float64)
    included = ~np.isnan(sums)
    # Results from before missing values were allowed carry no observed counts: every row was observed.
    observed = np.array([[c if v is None else v for v in (r.observed or [c] * len(r.sums))]
                         for r, c in zip(results, counts, strict=True)], dtype=np.float64)
    column_counts = (included * counts[:, None]).sum(axis=0)
    column_observed = np.where(included, observed, 0.0).sum(axis=0)
    column_sums, column_squares = np.nansum(sums, axis=0), np.nansum(squares, axis=0)
    fill = fill_values(spec, column_observed, column_sums)
    mean, scale = standardisation(column_counts, column_observed, column_sums, column_squares, fill)
    total = counts.sum()
    target_mean, target_scale = mean_and_scale(total, np.array([sum(r.target_sum for r in results)]),
                                               np.array([sum(r.target_sum_of_squares for r in results)]))
    # A histogram counts only where every hospital sent it; a suppressed bin counts as empty.
    shared = set.intersection(*(set(r.histograms) for r in results)) if results else set()
    histograms = {name: np.sum([[0 if v is None else v for v in r.histograms[name]] for r in results],
                               axis=0).astype(int).tolist() for name in sorted(shared)}
    # A binary target's mean is the training rows' event rate.
    threshold = spec.threshold_for(float(target_mean[0])) if spec.task == "binary" else None
    return GlobalPreprocessing(count=int(total), mean=mean.tolist(), scale=scale.tolist(), fill=fill.tolist(),
                               target_mean=float(target_mean[0]), target_scale=float(target_scale[0]),
                               histograms=histograms, threshold=threshold)


class RoundZero(NamedTuple):
    """What round 0's counts make of a run."""

    example_limits: dict[str, int]  # hospital -> its training rows, for each hospital that has any
    excluded: dict[str, str]  # hospital -> why it is left out of the run
    preprocessing: GlobalPreprocessing


def count_round_zero(config: RunConfig, stats: Mapping[str, StatsMetadata],
                     reduce: Callable[[list[StatsMetadata]], GlobalPreprocessing]) -> RoundZero | str:
    """The hospitals a run trains on (those with rows; the others are left out, each fit would be refused) and its
    preprocessing, reduced from their counts; or why the run cannot train: too few hospitals with rows, a privacy
    budget that cannot be met at one of them, or counts that cannot be combined."""
    example_limits = {h: m.count for h, m in stats.items() if m.count > 0}
    excluded = {h: "no valid training rows (0 counted in round 0)" for h in stats if h not in example_limits}
    if len(example_limits) < config.min_hospitals:
        return (f"round 0: {len(example_limits)} hospital(s) have training rows, {config.min_hospitals} needed "
                f"({', '.join(f'{h}: {why}' for h, why in sorted(excluded.items()))})")
    refusal = privacy_refusal(config, example_limits)
    if refusal is not None:
        return refusal
    try:
        return RoundZero(example_limits, excluded, reduce([stats[h] for h in example_limits]))
    except (ValueError, ArithmeticError) as error:
        return f"round 0: the hospitals' statistics cannot be combined: {error}"
