"""What a hospital computes for each task, on its own rows only (no network here; the node service wraps it).

Only aggregates leave: per-column counts, sums and sums of squares (cells describing fewer than
`small_cell_threshold` patients suppressed), model weights, example counts and metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from torch import nn

from health_mlops.data.preprocess import (GlobalPreprocessing, Preprocessor, encoded_columns, feature_columns,
                                          feature_histograms, fill_values, mean_and_scale, standardisation,
                                          stats_of_frame)
from health_mlops.data.split import hold_out_validation
from health_mlops.fl.coordinator import TaskKind, TaskResult, plan_for
from health_mlops.fl.metadata import StatsMetadata
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.strategies import Weights
from health_mlops.metrics import BOOTSTRAP_REPLICATES, binary_metrics
from health_mlops.ml.evaluate import evaluate_frame, predict_frame
from health_mlops.ml.model import model_with_weights, weights_as_numpy
from health_mlops.ml.directions import Directions
from health_mlops.ml.site_calibration import fit_site_calibration, local_baseline_loss, log_loss
from health_mlops.ml.train import mean_loss, train_model
from health_mlops.ml.train_config import TrainConfig
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


@dataclass
class HospitalWorker:
    """One hospital's side of the federation, over its own train and test rows."""

    hospital_id: str
    spec: DatasetSpec
    train: pd.DataFrame
    test: pd.DataFrame
    small_cell_threshold: int = 5
    rows_quarantined: int = 0  # rows validation set aside: reported with the stats, a count only
    # The training rows as (fit, validation) by validation fraction: split once, not in every round of a run
    _held_out: dict[float, tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=dict, init=False, repr=False)

    @cached_property
    def directions(self) -> Directions | None:
        return Directions.of(self.spec)

    def held_out(self, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The training rows as (fit, validation) for a run holding out `fraction` (`hold_out_validation`)."""
        if fraction not in self._held_out:
            self._held_out[fraction] = hold_out_validation(self.train, self.spec, self.hospital_id, fraction=fraction)
        return self._held_out[fraction]

    def handle(self, kind: TaskKind, config: RunConfig, weights: Weights, preprocessing: GlobalPreprocessing | None,
               round_number: int) -> TaskResult:
        """The task's result; its metadata carries `compute_seconds`, the hospital's share of a round's time.
        `preprocessing` is the run's (None only for round 0's stats)."""
        started = time.perf_counter()
        result = self._compute(kind, config, weights, preprocessing, round_number)
        result.metadata["compute_seconds"] = time.perf_counter() - started
        return result

    def _recalibrated(self, model: nn.Module, preprocessor: Preprocessor, fit: pd.DataFrame,
                      validation: pd.DataFrame) -> dict[str, object]:
        """The final model recalibrated on this hospital's validation rows; its test metrics so (flagged above this
        hospital's own event rate: its calibrated risks are this hospital's); and, on the validation rows, its log
        loss beside that of the hospital's own logistic regression. Nothing for a regression, or without
        validation rows of both outcomes."""
        if self.spec.task != "binary" or validation.empty:
            return {}
        validation_y = preprocessor.target(validation)
        validation_risk = predict_frame(model, preprocessor, validation)
        calibration = fit_site_calibration(validation_y, validation_risk)
        if calibration is None:
            return {}
        y, risk = preprocessor.target(self.test), calibration.apply(predict_frame(model, preprocessor, self.test))
        threshold = self.spec.threshold_for(float(preprocessor.target(self.train).mean()))
        metrics = binary_metrics(y, risk, threshold) if len(y) else {}
        local = local_baseline_loss(preprocessor.features(fit), preprocessor.target(fit),
                                    preprocessor.features(validation), validation_y)
        compared = {} if local is None else {"local_comparison": {
            "federated_loss": log_loss(validation_y, calibration.apply(validation_risk)), "local_loss": local}}
        return {"site_calibration": calibration.to_json(), **compared,
                "calibrated_metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}

    def _compute(self, kind: TaskKind, config: RunConfig, weights: Weights, preprocessing: GlobalPreprocessing | None,
                 round_number: int) -> TaskResult:
        if kind is TaskKind.stats:
            stats = hospital_stats(self.train, self.spec, self.small_cell_threshold)
            return TaskResult(stats.model_copy(update={"rows_quarantined": self.rows_quarantined}).model_dump())
        if preprocessing is None:
            raise ValueError(f"a {kind.value} task needs the run's preprocessing")
        preprocessor = Preprocessor.of_run(self.spec, preprocessing)
        model = model_with_weights(self.spec.model, len(preprocessor.mean), weights)
        # The incoming global model, before training; an undefined metric (e.g. AUC on one class) is None. The
        # final model's evaluation adds the AUC's bootstrap interval (done here, where the rows are) and the
        # counts and sums that metrics over all hospitals are built from.
        final = kind is TaskKind.evaluate
        metrics, summary = evaluate_frame(model, preprocessor, self.test, threshold=preprocessing.decision_threshold,
                                          bootstrap=BOOTSTRAP_REPLICATES if final else 0, summarise=final)
        evaluation = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        fit, validation = self.held_out(config.validation_fraction)
        validated = {"validation_rows": len(validation), "validation_loss_sum": 0.0 if validation.empty else
                     mean_loss(model, preprocessor.features(validation), preprocessor.target(validation),
                               self.spec.task) * len(validation)}
        if final:
            return TaskResult({"num_examples": len(self.test), "num_test_examples": len(self.test),
                               "metrics": evaluation, **validated,
                               **self._recalibrated(model, preprocessor, fit, validation),
                               **({"summary": summary.to_json()} if summary is not None else {})})
        train_config = TrainConfig(epochs=config.local_epochs, learning_rate=config.learning_rate,
                                   batch_size=config.batch_size_at(len(fit)), weight_decay=config.weight_decay,
                                   proximal_mu=(config.strategy.proximal_mu if config.strategy.name == "fedprox"
                                                else 0.0),
                                   seed=round_number, max_steps=config.local_steps,
                                   prior_rows=preprocessing.count)  # FedAvg stands for pooled training
        features, target = preprocessor.features(fit), preprocessor.target(fit)
        privacy: dict[str, int] = {}
        directions, scale = self.directions, np.asarray(preprocessor.scale)
        if config.privacy is None:
            result = train_model(model, features, target, self.spec.task, train_config, directions=directions,
                                 scale=scale)
        else:  # DP-SGD, with the noise the aggregator planned for this hospital's rows (the same function)
            from health_mlops.fl.privacy import train_model_private  # Opacus: 1.4 s to import, only when used

            plan = plan_for(config, len(fit))
            result, steps = train_model_private(model, features, target, self.spec.task, train_config, plan,
                                                epochs=config.local_epochs, directions=directions, scale=scale)
            privacy["dp_steps"] = steps
        return TaskResult({"num_examples": result.examples, "num_test_examples": len(self.test), "metrics": evaluation,
                           "train_loss": result.mean_loss, **validated, **privacy}, weights_as_numpy(model))
