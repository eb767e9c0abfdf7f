"""What a hospital computes for each task, on its own rows only (no network here; the node service wraps it).

Only aggregates leave: round 0's counts and sums (`fl.stats`, small cells suppressed), model weights, example
counts and metrics.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
from torch import nn

from health_mlops.data.preprocess import GlobalPreprocessing, Preprocessor
from health_mlops.data.split import hold_out_validation
from health_mlops.fl.privacy_budget import plan_for
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.fl.stats import hospital_stats
from health_mlops.fl.strategies import Weights
from health_mlops.fl.strategy_table import STRATEGIES
from health_mlops.metrics import BOOTSTRAP_REPLICATES, binary_metrics
from health_mlops.ml.directions import Directions
from health_mlops.ml.evaluate import evaluate_frame, predict_frame
from health_mlops.ml.model import model_with_weights, weights_as_numpy
from health_mlops.ml.site_calibration import fit_site_calibration, local_baseline_loss, log_loss
from health_mlops.ml.train import mean_loss, train_model
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec


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
                                   proximal_mu=(config.strategy.proximal_mu if STRATEGIES[config.strategy.name].proximal
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
