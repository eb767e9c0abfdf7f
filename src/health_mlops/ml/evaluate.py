"""Scoring a model on validated rows, in the target's own unit."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from health_mlops.data.preprocess import Preprocessor, encode_target
from health_mlops.ml.metrics import task_metrics
from health_mlops.ml.train import predict


def predict_frame(model: nn.Module, preprocessor: Preprocessor, frame: pd.DataFrame) -> np.ndarray:
    """Event probabilities (binary) or values in the target's unit (regression)."""
    task = preprocessor.spec.task
    return preprocessor.restore_target(predict(model, preprocessor.features(frame), task))


def evaluate_frame(model: nn.Module, preprocessor: Preprocessor, frame: pd.DataFrame) -> dict[str, float]:
    spec = preprocessor.spec
    return task_metrics(spec.task, encode_target(frame, spec), predict_frame(model, preprocessor, frame))
