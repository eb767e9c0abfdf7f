"""Site recalibration: a hospital's own correction of the federated model's risks, fitted on its validation rows.

One model serves hospitals whose event rates differ (0.4 % to 4 % in the synthetic cities; 37 % to 98 % in real
consortia): its risks are right on average over the federation and off at a site whose patients are sicker or
healthier. Logistic recalibration (Cox 1958) keeps the model's ranking and moves its risks to the site's:
P(event) = sigmoid(intercept + slope · logit(risk)). With too few events for a slope (fewer than
`MIN_EVENTS_FOR_SLOPE` of either outcome) only the intercept is fitted, the slope kept at 1 ("calibration in the
large"); with one outcome only, nothing is.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from health_mlops.metrics import MIN_EVENTS_FOR_SLOPE, intercept_in_the_large

_EPS = 1e-7
# The slope's fit is mildly regularised (scikit-learn's C): a few separable validation rows would send it to infinity.
_SLOPE_C = 10.0


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


@dataclass(frozen=True)
class SiteCalibration:
    intercept: float
    slope: float
    rows: int  # the validation rows it was fitted on
    events: int
    threshold: float | None = None  # the site's own decision threshold for its calibrated risks (served models)

    def apply(self, risk: np.ndarray) -> np.ndarray:
        """The site's risks for the model's `risk`s (float64; the order of patients is kept when slope > 0)."""
        return 1.0 / (1.0 + np.exp(-(self.intercept + self.slope * _logit(risk))))

    def to_json(self) -> dict[str, Any]:
        return {"intercept": self.intercept, "slope": self.slope, "rows": self.rows, "events": self.events,
                **({} if self.threshold is None else {"threshold": self.threshold})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SiteCalibration:
        threshold = data.get("threshold")
        return cls(float(data["intercept"]), float(data["slope"]), int(data["rows"]), int(data["events"]),
                   None if threshold is None else float(threshold))


def fit_site_calibration(outcome: np.ndarray, risk: np.ndarray) -> SiteCalibration | None:
    """The recalibration of `risk` (the model's) to `outcome` (0/1) on one site's validation rows; None when
    they hold one outcome only (nothing to fit)."""
    y = np.asarray(outcome, dtype=np.float64)
    events = int(y.sum())
    if not 0 < events < len(y):
        return None
    lp = _logit(risk)
    if min(events, len(y) - events) >= MIN_EVENTS_FOR_SLOPE:
        # scikit-learn (about 100 MB resident) loads only here, at a hospital, never in the aggregator or serving.
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted = LogisticRegression(C=_SLOPE_C, max_iter=1000).fit(lp[:, None], y)
        slope, intercept = float(fitted.coef_[0, 0]), float(fitted.intercept_[0])
        if slope > 0 and math.isfinite(slope) and math.isfinite(intercept):
            return SiteCalibration(intercept, slope, len(y), events)

    return SiteCalibration(intercept_in_the_large(y, lp), 1.0, len(y), events)


def log_loss(outcome: np.ndarray, risk: np.ndarray) -> float:
    p = np.clip(np.asarray(risk, dtype=np.float64), _EPS, 1 - _EPS)
    y = np.asarray(outcome, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def local_baseline_loss(features: np.ndarray, outcome: np.ndarray, validation_features: np.ndarray,
                        validation_outcome: np.ndarray) -> float | None:
    """The validation log loss of the hospital's own logistic regression on its training rows (the honest
    baseline on small data; scikit-learn's default L2), to tell a hospital when the federation's recalibrated
    model serves it worse; None when its training rows hold one outcome."""
    y = np.asarray(outcome, dtype=np.float64)
    if not 0 < y.sum() < len(y):
        return None
    from sklearn.linear_model import LogisticRegression

    fitted = LogisticRegression(max_iter=2000).fit(features, y)
    return log_loss(validation_outcome, fitted.predict_proba(validation_features)[:, 1])
