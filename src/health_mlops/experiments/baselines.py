"""The two baselines a federation is judged against: one model on pooled data, one model per hospital.

Pooled training is what the consortium could do if every record could be moved to one place (it cannot);
local training is what each hospital can do alone. A federated model should come close to the first and
beat the second at every hospital.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from torch import nn

from health_mlops.data.preprocess import Preprocessor, encode_target, imputation, stats_of_frame
from health_mlops.data.split import HospitalSplit, hold_out_validation
from health_mlops.metrics import hospitals_averaged, mean_over_hospitals, task_metrics, undefined_reasons
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.ml.model import model_with_weights
from health_mlops.ml.directions import Directions
from health_mlops.ml.train import train_model
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec


@dataclass
class ExperimentResult:
    """Scores of one way of training: per hospital (each on its own test rows), their mean over hospitals (what
    the field reports), and overall (every hospital's test rows together). `undefined` says, per hospital, why a
    metric is null."""

    mode: str
    task: str
    metric: str
    overall: dict[str, float]
    per_hospital: dict[str, dict[str, float]]
    mean_over_hospitals: dict[str, float | None] = field(default_factory=dict)
    undefined: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)
    # With `probe` rows asked for: each model's predictions for them (pooled and federated one model, local-only
    # one per hospital); an experiment's own measure, left out of `to_json`.
    probe_predictions: list[np.ndarray] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "task": self.task, "metric": self.metric, "overall": _shaped(self.overall),
                "per_hospital": {h: {**_shaped(m), "undefined": self.undefined.get(h, {})}
                                 for h, m in self.per_hospital.items()},
                "mean_over_hospitals": _shaped(self.mean_over_hospitals),
                "hospitals_averaged": hospitals_averaged(self.per_hospital), **self.extra}


def _shaped(metrics: Mapping[str, float | None]) -> dict[str, object]:
    """Metrics as `--json` gives them: the AUC's interval as `auc_ci: [low, high]` (null if undefined), its
    standard error left out; NaN becomes null when printed."""
    shaped: dict[str, object] = {k: v for k, v in metrics.items() if k not in ("auc_ci_low", "auc_ci_high", "auc_se")}
    if "auc_ci_low" in metrics:
        low, high = metrics["auc_ci_low"], metrics["auc_ci_high"]
        defined = low is not None and high is not None and math.isfinite(low) and math.isfinite(high)
        shaped["auc_ci"] = [low, high] if defined else None
    return shaped


def event_rate(spec: DatasetSpec, train: pd.DataFrame) -> float:
    return float(encode_target(train, spec).mean()) if len(train) else 0.5


def score_predictions(spec: DatasetSpec, splits: list[HospitalSplit], predictions: list[np.ndarray],
                      thresholds: list[float]) -> tuple[dict[str, float], dict[str, dict[str, float]],
                                                        dict[str, float | None], dict[str, dict[str, str]]]:
    """(overall, per hospital, mean over hospitals, why undefined) of each hospital's predictions on its test
    rows, each flagged at its model's threshold (binary tasks)."""
    targets = [encode_target(s.test, spec) for s in splits]
    per_hospital = {s.hospital_id: task_metrics(spec.task, y, p, threshold=t)
                    for s, y, p, t in zip(splits, targets, predictions, thresholds, strict=True)}
    undefined = {}
    if spec.task == "binary":
        undefined = {s.hospital_id: undefined_reasons(y, p, t, spec.target.name)
                     for s, y, p, t in zip(splits, targets, predictions, thresholds, strict=True)}
    # Overall, each row is flagged at its own hospital's model's threshold.
    row_thresholds = np.concatenate([np.full(len(y), t) for y, t in zip(targets, thresholds, strict=True)])
    overall = task_metrics(spec.task, np.concatenate(targets), np.concatenate(predictions), threshold=row_thresholds)
    return overall, per_hospital, mean_over_hospitals(per_hospital), undefined


# Progress hook: called with (hospital id, or "pooled", share of its training done) after each epoch.
ProgressHook = Callable[[str, float], None]


def _fit(spec: DatasetSpec, splits: list[HospitalSplit], config: TrainConfig,
         on_progress: Callable[[float], None] | None) -> tuple[nn.Module, Preprocessor]:
    """One model on these hospitals' training rows, each hospital holding out its own validation part."""
    parts = [hold_out_validation(s.train, spec, s.hospital_id, fraction=config.validation_fraction) for s in splits]
    train = pd.concat([s.train for s in splits], ignore_index=True)
    fit = pd.concat([f for f, _ in parts], ignore_index=True)
    validation = pd.concat([v for _, v in parts], ignore_index=True)
    preprocessor = Preprocessor.from_stats(spec, stats_of_frame(train, spec)).with_ranges_of(train)
    # The same start as a federation's: the task's model, seeded, inside the spec's directions
    model = model_with_weights(spec.model, len(preprocessor.mean), initial_weights(spec, config.seed))
    directions = Directions.of(spec)
    train_model(model, preprocessor.features(fit), preprocessor.target(fit), spec.task, config, on_progress,
                directions=directions, scale=np.asarray(preprocessor.scale),
                validation=(preprocessor.features(validation), preprocessor.target(validation)))
    return model, preprocessor


def _hook(on_progress: ProgressHook | None, name: str) -> Callable[[float], None] | None:
    return None if on_progress is None else (lambda share: on_progress(name, share))


def run_pooled(spec: DatasetSpec, splits: list[HospitalSplit], config: TrainConfig,
               on_progress: ProgressHook | None = None, *, probe: pd.DataFrame | None = None) -> ExperimentResult:
    """One model trained on every hospital's training rows together (`probe`: rows it also predicts)."""
    pooled = pd.concat([s.train for s in splits], ignore_index=True)
    model, preprocessor = _fit(spec, splits, config, _hook(on_progress, "pooled"))
    predictions = [predict_frame(model, preprocessor, s.test) for s in splits]
    threshold = spec.threshold_for(event_rate(spec, pooled))
    scores = score_predictions(spec, splits, predictions, [threshold] * len(splits))
    return ExperimentResult("pooled", spec.task, spec.primary_metric, *scores,
                            extra={"imputation": imputation(spec, preprocessor.fill),
                                   **({"threshold": threshold} if spec.task == "binary" else {})},
                            probe_predictions=[] if probe is None else [predict_frame(model, preprocessor, probe)])


def run_local(spec: DatasetSpec, splits: list[HospitalSplit], config: TrainConfig,
              on_progress: ProgressHook | None = None, *, probe: pd.DataFrame | None = None) -> ExperimentResult:
    """One model per hospital, each trained and scored on its own hospital's rows only (`probe`: rows each model
    also predicts)."""
    predictions, probed = [], []
    imputed: dict[str, dict[str, float | str]] = {}
    for split in splits:
        model, preprocessor = _fit(spec, [split], config, _hook(on_progress, split.hospital_id))
        predictions.append(predict_frame(model, preprocessor, split.test))
        if probe is not None:
            probed.append(predict_frame(model, preprocessor, probe))
        imputed[split.hospital_id] = imputation(spec, preprocessor.fill)
    # Each hospital's own model flags risks above its own training rows' event rate.
    thresholds = [spec.threshold_for(event_rate(spec, split.train)) for split in splits]
    scores = score_predictions(spec, splits, predictions, thresholds)
    extra: dict[str, object] = {"imputation": imputed}
    if spec.task == "binary":
        extra["threshold"] = {split.hospital_id: t for split, t in zip(splits, thresholds, strict=True)}
    return ExperimentResult("local", spec.task, spec.primary_metric, *scores, extra=extra, probe_predictions=probed)

