"""Model metrics by task (no torch here, so data generation and serving can use them)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

# Probabilities are clipped before log loss so one confident mistake is large, not infinite.
_EPS = 1e-7


def binary_metrics(y_true: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """AUC, accuracy at 0.5, Brier score and log loss; AUC is NaN when the rows hold one class only."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1 - _EPS)
    both_classes = 0 < y.sum() < len(y)
    return {
        "auc": float(skm.roc_auc_score(y, p)) if both_classes else float("nan"),
        "accuracy": float(np.mean((p >= 0.5) == (y == 1))),
        "brier": float(np.mean((p - y) ** 2)),
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
    }


def regression_metrics(y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """R², RMSE and MAE in the target's unit."""
    y = np.asarray(y_true, dtype=np.float64)
    yhat = np.asarray(prediction, dtype=np.float64)
    residual = y - yhat
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "r2": 1.0 - float(np.sum(residual**2)) / total if total > 0 else float("nan"),
        "rmse": float(np.sqrt(np.mean(residual**2))),
        "mae": float(np.mean(np.abs(residual))),
    }


def task_metrics(task: str, y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    if task == "binary":
        return binary_metrics(y_true, prediction)
    return regression_metrics(y_true, prediction)
