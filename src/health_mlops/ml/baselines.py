"""The two baselines a federation is judged against: one model on pooled data, one model per hospital.

Pooled training is what the consortium could do if every record could be moved to one place (it cannot);
local training is what each hospital can do alone. A federated model should come close to the first and
beat the second at every hospital.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from torch import nn

from health_mlops.data.hospital import HospitalData
from health_mlops.data.preprocess import Preprocessor, encode_target, imputation, stats_of_frame
from health_mlops.data.split import split_indices
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.metrics import task_metrics
from health_mlops.ml.model import build_model
from health_mlops.ml.train import train_model
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec


@dataclass(frozen=True)
class HospitalSplit:
    hospital_id: str
    train: pd.DataFrame
    test: pd.DataFrame


def split_hospitals(hospitals: dict[str, HospitalData], *, seed: int, test_fraction: float) -> list[HospitalSplit]:
    splits = []
    for hospital_id, data in hospitals.items():
        train, test = split_indices(len(data.frame), hospital_id, seed=seed, test_fraction=test_fraction)
        splits.append(HospitalSplit(hospital_id, data.frame.iloc[train].reset_index(drop=True),
                                    data.frame.iloc[test].reset_index(drop=True)))
    return splits


@dataclass
class ExperimentResult:
    """Scores of one way of training, overall (all hospitals' test rows together) and per hospital."""

    mode: str
    task: str
    metric: str
    overall: dict[str, float]
    per_hospital: dict[str, dict[str, float]]
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"mode": self.mode, "task": self.task, "metric": self.metric, "overall": self.overall,
                "per_hospital": self.per_hospital, **self.extra}


def score_predictions(spec: DatasetSpec, splits: list[HospitalSplit], predictions: list[np.ndarray]) -> tuple[
        dict[str, float], dict[str, dict[str, float]]]:
    targets = [encode_target(s.test, spec) for s in splits]
    per_hospital = {s.hospital_id: task_metrics(spec.task, y, p)
                    for s, y, p in zip(splits, targets, predictions, strict=True)}
    overall = task_metrics(spec.task, np.concatenate(targets), np.concatenate(predictions))
    return overall, per_hospital


# Progress hook: called with (hospital id, or "pooled", epoch) after each epoch.
EpochHook = Callable[[str, int], None]


def _fit(spec: DatasetSpec, train: pd.DataFrame, config: TrainConfig, on_epoch: Callable[[int], None] | None
         ) -> tuple[nn.Module, Preprocessor]:
    preprocessor = Preprocessor.from_stats(spec, stats_of_frame(train, spec))
    features = preprocessor.features(train)
    model = build_model(spec.model, features.shape[1], seed=config.seed)
    train_model(model, features, preprocessor.target(train), spec.task, config, on_epoch)
    return model, preprocessor


def _hook(on_epoch: EpochHook | None, name: str) -> Callable[[int], None] | None:
    return None if on_epoch is None else (lambda epoch: on_epoch(name, epoch))


def run_pooled(spec: DatasetSpec, splits: list[HospitalSplit], config: TrainConfig,
               on_epoch: EpochHook | None = None) -> ExperimentResult:
    """One model trained on every hospital's training rows together."""
    pooled = pd.concat([s.train for s in splits], ignore_index=True)
    model, preprocessor = _fit(spec, pooled, config, _hook(on_epoch, "pooled"))
    predictions = [predict_frame(model, preprocessor, s.test) for s in splits]
    overall, per_hospital = score_predictions(spec, splits, predictions)
    return ExperimentResult("pooled", spec.task, spec.primary_metric, overall, per_hospital,
                            {"imputation": imputation(spec, preprocessor.fill)})


def run_local(spec: DatasetSpec, splits: list[HospitalSplit], config: TrainConfig,
              on_epoch: EpochHook | None = None) -> ExperimentResult:
    """One model per hospital, each trained and scored on its own hospital's rows only."""
    predictions = []
    imputed: dict[str, dict[str, float | str]] = {}
    for split in splits:
        model, preprocessor = _fit(spec, split.train, config, _hook(on_epoch, split.hospital_id))
        predictions.append(predict_frame(model, preprocessor, split.test))
        imputed[split.hospital_id] = imputation(spec, preprocessor.fill)
    overall, per_hospital = score_predictions(spec, splits, predictions)
    return ExperimentResult("local", spec.task, spec.primary_metric, overall, per_hospital, {"imputation": imputed})

