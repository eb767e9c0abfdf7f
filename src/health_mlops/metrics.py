"""Model metrics by task, as a clinician reads them, computed where the rows are (no torch here). The metrics of
a model's quality; the metrics Prometheus scrapes are `monitoring.py`'s. A leaf: it imports nothing of the
project, so data/ (the generator's Bayes-optimal scores) and ml/ both use it.

A binary model is judged by its ranking (AUC with a bootstrap 95% interval), its probabilities (Brier score, log
loss, calibration slope and intercept, reliability bins) and its decisions at a threshold (sensitivity,
specificity, PPV, NPV, accuracy, balanced accuracy). In a federation each hospital computes these on its own test
rows; what may leave it to build metrics over all hospitals is a `BinarySummary`: counts and sums only
(confusion counts, squared-error and log-loss sums, calibration bins, score counts per outcome on a fine grid).
Everything in a summary adds up exactly, except the pooled AUC, which needs every pair of rows across
hospitals: from the score counts it is exact up to pairs that share a grid bin, and the bound on that error is
returned beside it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq

# Probabilities are clipped before log loss and logits so one confident mistake is large, not infinite.
_EPS = 1e-7
BOOTSTRAP_REPLICATES = 1000
_BOOTSTRAP_CHUNK = 100  # replicates drawn at once: memory is chunk × rows
CALIBRATION_BINS = 10  # reliability bins of equal width on [0, 1]
# Score counts for a pooled AUC and ROC curves: bins of equal width on the logit scale, where risks spread out
# (equal widths on [0, 1] would put most patients of a 5% event rate in the first few bins).
SCORE_BINS = 400
SCORE_LOGIT_RANGE = 8.0  # logits beyond ±8 (risks below 0.03% or above 99.97%) share the outermost bins
# Calibration near a risk is read in bands of the test population's predicted risk of about equal size (deciles):
# bins of equal width would hold nearly every patient of a 3 % event rate in the first one.
RISK_BANDS = 10

BINARY_METRICS = ("auc", "auc_ci_low", "auc_ci_high", "auc_se", "brier", "log_loss", "accuracy", "sensitivity",
                  "specificity", "ppv", "npv", "balanced_accuracy", "calibration_slope", "calibration_intercept")
REGRESSION_METRICS = ("r2", "rmse", "mae")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The AUC (Mann-Whitney, ties counting one half) of each row of `weights` (replicates × rows) over the rows
    (y, p): every bootstrap replicate in one pass over the sorted scores. NaN where a replicate has one class."""
    order = np.argsort(p, kind="stable")
    scores, positive = p[order], y[order] == 1
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # groups of tied scores
    w = weights[:, order]
    positives = np.add.reduceat(np.where(positive, w, 0), starts, axis=1).astype(np.float64)
    negatives = np.add.reduceat(np.where(positive, 0, w), starts, axis=1).astype(np.float64)
    below = np.cumsum(negatives, axis=1) - negatives
    pairs = positives.sum(axis=1) * negatives.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (positives * (below + negatives / 2)).sum(axis=1) / pairs, np.nan)


def bootstrap_auc(y: np.ndarray, p: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """AUCs of `replicates` resamples of the rows with replacement (NaN where a resample has one class)."""
    found = [weighted_auc(y, p, counts) for counts in resample_counts(len(y), replicates, seed)]
    return np.concatenate(found) if found else np.array([])


def resample_counts(n: int, replicates: int, seed: int) -> list[np.ndarray]:
    """How often each of `n` rows is drawn in each of `replicates` resamples with replacement, in chunks of
    replicates × rows: the same `seed` draws the same resamples, so two models' AUCs on them are paired."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, replicates, _BOOTSTRAP_CHUNK):
        chunk = min(_BOOTSTRAP_CHUNK, replicates - start)
        drawn = rng.integers(0, n, size=(chunk, n)) + n * np.arange(chunk)[:, None]  # each replicate's rows
        chunks.append(np.bincount(drawn.ravel(), minlength=chunk * n).reshape(chunk, n))
    return chunks


def calibration(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of logistic recalibration: the slope of logit P(y) = a + b·logit(p), and the
    intercept with the slope fixed at 1 (calibration in the large). A calibrated model has (1, 0); a slope
    below 1 means its risks are too extreme. NaN on one class."""
    if not 0 < y.sum() < len(y):
        return math.nan, math.nan
    # scikit-learn (about 100 MB resident) loads only where a slope is fitted: at a hospital, not in the aggregator
    # or the dashboard, which import this module for the counts.
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    lp = _logit(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # separable rows: the slope is large, as it should be
        slope = float(LogisticRegression(C=np.inf, max_iter=1000).fit(lp[:, None], y).coef_[0, 0])

    return slope, intercept_in_the_large(y, lp)


# Fewer events (or non-events) than this fit no calibration slope: a site's recalibration is then an intercept.
MIN_EVENTS_FOR_SLOPE = 10


def intercept_in_the_large(y: np.ndarray, logits: np.ndarray) -> float:
    """The intercept a of logit P(y) = a + logit(p), the slope fixed at 1: the shift that makes the mean risk the
    observed event rate (both outcomes needed)."""
    def score(a: float) -> float:  # the derivative of the log-likelihood in a, decreasing: one root
        return float(np.sum(y - 1 / (1 + np.exp(-(a + logits)))))

    return float(brentq(score, -50.0, 50.0, xtol=1e-12))


def threshold_metrics(tn: float, fp: float, fn: float, tp: float) -> dict[str, float]:
    """The decision metrics of one confusion matrix (NaN where a denominator is zero)."""
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {"accuracy": _ratio(tp + tn, tn + fp + fn + tp), "sensitivity": sensitivity, "specificity": specificity,
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn),
            "balanced_accuracy": (sensitivity + specificity) / 2}


def binary_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float | np.ndarray, *,
                   bootstrap: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict[str, float]:
    """Every metric of `BINARY_METRICS` on these rows, flagging a row at or above `threshold` (one for all rows,
    or one per row); NaN where undefined (see `undefined_reasons`). With `bootstrap=0` the AUC's interval is
    left out (each round's quick look; the final model gets it)."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1 - _EPS)
    found = {name: math.nan for name in BINARY_METRICS}
    if len(y) == 0:
        return found
    found["auc"] = float(weighted_auc(y, p, np.ones((1, len(y))))[0])
    if bootstrap and math.isfinite(found["auc"]):
        replicates = bootstrap_auc(y, p, bootstrap, seed)
        replicates = replicates[np.isfinite(replicates)]
        if len(replicates) >= 0.5 * bootstrap:  # most resamples missed a class: too few events for an interval
            found["auc_ci_low"], found["auc_ci_high"] = (float(v) for v in np.percentile(replicates, [2.5, 97.5]))
            found["auc_se"] = float(replicates.std(ddof=1))
    if not bootstrap:
        for name in ("auc_ci_low", "auc_ci_high", "auc_se"):
            del found[name]
    found["brier"] = float(np.mean((p - y) ** 2))
    found["log_loss"] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    found.update(threshold_metrics(*_confusion(y, p, threshold)))
    found["calibration_slope"], found["calibration_intercept"] = calibration(y, p)
    if min(y.sum(), len(y) - y.sum()) < MIN_EVENTS_FOR_SLOPE:  # a slope from a handful of events is noise
        found["calibration_slope"] = math.nan
    return found


def _confusion(y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray) -> tuple[int, int, int, int]:
    flagged = p >= threshold
    positive = y == 1
    return (int((~flagged & ~positive).sum()), int((flagged & ~positive).sum()), int((~flagged & positive).sum()),
            int((flagged & positive).sum()))


def undefined_reasons(y_true: np.ndarray, probability: np.ndarray, threshold: float, target: str
                      ) -> dict[str, str]:
    """Why each undefined metric of these rows is undefined, in words (shown beside the null)."""
    y = np.asarray(y_true, dtype=np.float64)
    flagged = int((np.asarray(probability) >= threshold).sum())
    return _undefined(len(y), int(y.sum()), flagged, threshold, target)


def undefined_from_counts(summary: BinarySummary, target: str) -> dict[str, str]:
    """`undefined_reasons` from what a hospital sent: its summary's counts."""
    tn, fp, fn, tp = summary.confusion
    return _undefined(summary.rows, fn + tp, fp + tp, summary.threshold, target)


def _undefined(rows: int, positives: int, flagged: int, threshold: float, target: str) -> dict[str, str]:
    if rows == 0:
        return {name: "no test rows" for name in BINARY_METRICS}
    reasons: dict[str, str] = {}
    if positives in (0, rows):
        outcome = int(positives == rows)
        why = f"its {rows} test rows all have {target} = {outcome}"
        for name in ("auc", "auc_ci_low", "auc_ci_high", "auc_se", "calibration_slope", "calibration_intercept",
                     "balanced_accuracy", "specificity" if outcome == 1 else "sensitivity"):
            reasons[name] = why
    elif min(positives, rows - positives) < MIN_EVENTS_FOR_SLOPE:
        reasons["calibration_slope"] = (f"its {rows} test rows hold {positives} with {target} = 1 and "
                                        f"{rows - positives} with 0: a slope needs {MIN_EVENTS_FOR_SLOPE} of each")
    if flagged == 0:
        reasons["ppv"] = f"no row has a risk at or above the threshold {threshold:.3g}"
    if flagged == rows:
        reasons["npv"] = f"no row has a risk below the threshold {threshold:.3g}"
    return reasons


def regression_metrics(y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """R², RMSE and MAE in the target's unit."""
    y = np.asarray(y_true, dtype=np.float64)
    yhat = np.asarray(prediction, dtype=np.float64)
    if len(y) == 0:
        return {name: math.nan for name in REGRESSION_METRICS}
    residual = y - yhat
    total = float(np.sum((y - y.mean()) ** 2))
    return {
        "r2": 1.0 - float(np.sum(residual**2)) / total if total > 0 else math.nan,
        "rmse": float(np.sqrt(np.mean(residual**2))),
        "mae": float(np.mean(np.abs(residual))),
    }


def task_metrics(task: str, y_true: np.ndarray, prediction: np.ndarray, *, threshold: float | np.ndarray = 0.5,
                 bootstrap: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict[str, float]:
    if task == "binary":
        return binary_metrics(y_true, prediction, threshold, bootstrap=bootstrap, seed=seed)
    return regression_metrics(y_true, prediction)


def score_bin(p: np.ndarray) -> np.ndarray:
    """Each risk's bin on the logit grid of `SCORE_BINS` bins."""
    scaled = (_logit(np.asarray(p, dtype=np.float64)) + SCORE_LOGIT_RANGE) / (2 * SCORE_LOGIT_RANGE)
    return np.clip((scaled * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)


def score_bin_edges() -> np.ndarray:
    """The grid's edges as risks (the outermost bins are open)."""
    logits = np.linspace(-SCORE_LOGIT_RANGE, SCORE_LOGIT_RANGE, SCORE_BINS + 1)
    return 1 / (1 + np.exp(-logits))


def share_below(counts: Sequence[float], risk: float) -> float:
    """The share of the rows counted per score bin (`counts`) whose predicted risk is below `risk`: the bins below
    its bin, and its own bin's rows spread evenly over the bin's logits. NaN without rows."""
    rows = np.asarray(counts, dtype=np.float64)
    total = rows.sum()
    if total == 0:
        return math.nan
    scaled = (float(_logit(np.asarray([risk]))[0]) + SCORE_LOGIT_RANGE) / (2 * SCORE_LOGIT_RANGE) * SCORE_BINS
    position = min(max(scaled, 0.0), float(SCORE_BINS))
    below = int(min(position, SCORE_BINS - 1))
    return float((rows[:below].sum() + rows[below] * (position - below)) / total)


@dataclass(frozen=True)
class BinarySummary:
    """Counts and sums of a binary model's predictions on some rows: all that metrics over several hospitals
    need. Summaries add up; `metrics` reads the combined numbers."""

    threshold: float
    confusion: tuple[int, int, int, int]  # tn, fp, fn, tp at the threshold
    squared_error_sum: float
    log_loss_sum: float
    calibration_count: tuple[int, ...]  # per reliability bin: rows,
    calibration_predicted: tuple[float, ...]  # sum of predicted risks,
    calibration_observed: tuple[int, ...]  # and events
    score_positive: tuple[int, ...]  # per score bin: rows with the event,
    score_negative: tuple[int, ...]  # and without

    @classmethod
    def of(cls, y_true: np.ndarray, probability: np.ndarray, threshold: float) -> BinarySummary:
        y = np.asarray(y_true, dtype=np.float64)
        p = np.clip(np.asarray(probability, dtype=np.float64), _EPS, 1 - _EPS)
        reliability = np.minimum((p * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
        scores = score_bin(p)
        positive = y == 1
        return cls(
            threshold=float(threshold), confusion=_confusion(y, p, threshold),
            squared_error_sum=float(np.sum((p - y) ** 2)),
            log_loss_sum=float(-np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))),
            calibration_count=tuple(int(c) for c in np.bincount(reliability, minlength=CALIBRATION_BINS)),
            calibration_predicted=tuple(float(s) for s in np.bincount(reliability, p, minlength=CALIBRATION_BINS)),
            calibration_observed=tuple(int(c) for c in np.bincount(reliability[positive],
                                                                   minlength=CALIBRATION_BINS)),
            score_positive=tuple(int(c) for c in np.bincount(scores[positive], minlength=SCORE_BINS)),
            score_negative=tuple(int(c) for c in np.bincount(scores[~positive], minlength=SCORE_BINS)))

    @property
    def rows(self) -> int:
        return sum(self.confusion)

    def __add__(self, other: BinarySummary) -> BinarySummary:
        if other.threshold != self.threshold:
            raise ValueError(f"summaries at thresholds {self.threshold} and {other.threshold} do not add up")

        def add(a: tuple, b: tuple) -> tuple:
            return tuple(x + y for x, y in zip(a, b, strict=True))

        return BinarySummary(self.threshold, add(self.confusion, other.confusion),
                             self.squared_error_sum + other.squared_error_sum,
                             self.log_loss_sum + other.log_loss_sum,
                             add(self.calibration_count, other.calibration_count),
                             add(self.calibration_predicted, other.calibration_predicted),
                             add(self.calibration_observed, other.calibration_observed),
                             add(self.score_positive, other.score_positive),
                             add(self.score_negative, other.score_negative))

    def auc(self) -> tuple[float, float]:
        """(AUC, bound): the AUC from the score counts, counting pairs in one bin as ties, and the most that
        differs from the AUC of the exact scores (those pairs' share of all pairs, halved). NaN on one class."""
        positives, negatives = np.asarray(self.score_positive, float), np.asarray(self.score_negative, float)
        pairs = positives.sum() * negatives.sum()
        if pairs == 0:
            return math.nan, math.nan
        below = np.cumsum(negatives) - negatives
        auc = float((positives * (below + negatives / 2)).sum() / pairs)
        return auc, float((positives * negatives).sum() / pairs / 2)

    def roc_curve(self) -> tuple[list[float], list[float]]:
        """(false positive rates, true positive rates) at every score-bin edge, from (0, 0) to (1, 1)."""
        positives, negatives = np.asarray(self.score_positive, float), np.asarray(self.score_negative, float)
        tpr = np.r_[0.0, np.cumsum(positives[::-1])] / max(positives.sum(), 1)
        fpr = np.r_[0.0, np.cumsum(negatives[::-1])] / max(negatives.sum(), 1)
        return fpr.tolist(), tpr.tolist()

    def risk_counts(self) -> list[int]:
        """Rows per score bin: the predicted risks' distribution, as `share_below` reads it."""
        return [p + n for p, n in zip(self.score_positive, self.score_negative, strict=True)]

    def risk_bands(self, bands: int = RISK_BANDS) -> list[dict[str, float | int]]:
        """The rows cut by predicted risk into `bands` groups of about equal size (deciles), from the score counts:
        each band's risk range (edges of the score grid), rows, mean predicted risk (at its bins' centres) and
        observed event rate. A bin is not split, so bands follow the grid and may hold more or fewer rows."""
        positives = np.asarray(self.score_positive, dtype=np.float64)
        rows = positives + np.asarray(self.score_negative, dtype=np.float64)
        total = rows.sum()
        if total == 0:
            return []
        edges = score_bin_edges()
        edges[0], edges[-1] = 0.0, 1.0  # the outermost bins are open
        centres = 1 / (1 + np.exp(-np.linspace(-SCORE_LOGIT_RANGE, SCORE_LOGIT_RANGE, 2 * SCORE_BINS + 1)[1::2]))
        band = np.minimum(((np.cumsum(rows) - rows / 2) / total * bands).astype(np.int64), bands - 1)
        found: list[dict[str, float | int]] = []
        for k in range(bands):
            members = np.flatnonzero((band == k) & (rows > 0))
            if len(members) == 0:
                continue
            n = rows[members].sum()
            found.append({"low": float(edges[members[0]]), "high": float(edges[members[-1] + 1]), "rows": int(n),
                          "predicted": float((centres[members] * rows[members]).sum() / n),
                          "observed": float(positives[members].sum() / n)})
        return found

    def reliability(self) -> list[dict[str, float | int | None]]:
        """Per reliability bin with rows: its range, rows, mean predicted risk and observed event rate."""
        bins: list[dict[str, float | int | None]] = []
        for k, (n, predicted, observed) in enumerate(zip(self.calibration_count, self.calibration_predicted,
                                                         self.calibration_observed, strict=True)):
            if n:
                bins.append({"low": k / CALIBRATION_BINS, "high": (k + 1) / CALIBRATION_BINS, "rows": n,
                             "predicted": predicted / n, "observed": observed / n})
        return bins

    def metrics(self) -> dict[str, float]:
        """Brier score, log loss, the decision metrics and the AUC (with `auc_error_bound`) of the rows."""
        n = self.rows
        auc, bound = self.auc()
        return {"auc": auc, "auc_error_bound": bound, "brier": _ratio(self.squared_error_sum, n),
                "log_loss": _ratio(self.log_loss_sum, n), **threshold_metrics(*self.confusion)}

    def to_json(self) -> dict[str, object]:
        return {"threshold": self.threshold, "confusion": list(self.confusion),
                "squared_error_sum": self.squared_error_sum, "log_loss_sum": self.log_loss_sum,
                "calibration_count": list(self.calibration_count),
                "calibration_predicted": list(self.calibration_predicted),
                "calibration_observed": list(self.calibration_observed),
                "score_positive": list(self.score_positive), "score_negative": list(self.score_negative)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BinarySummary:
        def ints(key: str) -> tuple[int, ...]:
            return tuple(int(v) for v in data[key])

        confusion = ints("confusion")
        return cls(float(data["threshold"]), (confusion[0], confusion[1], confusion[2], confusion[3]),
                   float(data["squared_error_sum"]), float(data["log_loss_sum"]), ints("calibration_count"),
                   tuple(float(v) for v in data["calibration_predicted"]), ints("calibration_observed"),
                   ints("score_positive"), ints("score_negative"))


def combine(summaries: Iterable[BinarySummary]) -> BinarySummary:
    parts = list(summaries)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _defined(metrics: Mapping[str, float | None], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def hospitals_averaged(per_hospital: Mapping[str, Mapping[str, float | None]]) -> dict[str, int]:
    """How many hospitals each metric's mean over hospitals averages (those where it is defined): a mean over 3
    of 4 hospitals says so."""
    names = [name for name in (*BINARY_METRICS, *REGRESSION_METRICS) if any(name in m for m in per_hospital.values())]
    return {name: sum(_defined(m, name) is not None for m in per_hospital.values()) for name in names}


def mean_over_hospitals(per_hospital: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """Each metric's mean over the hospitals where it is defined (what the field reports: every hospital counts
    once, whatever its size). The AUC's interval is the mean ± 1.96 standard errors, the hospitals' bootstrap
    errors combined as independent: se = sqrt(Σ se_h²) / H (none if a hospital has an AUC without an interval)."""
    names = [name for name in (*BINARY_METRICS, *REGRESSION_METRICS) if any(name in m for m in per_hospital.values())]
    found: dict[str, float | None] = {}
    for name in names:
        values = [v for m in per_hospital.values() if (v := _defined(m, name)) is not None]
        found[name] = float(np.mean(values)) if values else None
    if "auc_se" in found:
        errors = [_defined(m, "auc_se") for m in per_hospital.values() if _defined(m, "auc") is not None]
        found["auc_se"] = found["auc_ci_low"] = found["auc_ci_high"] = None
        mean = found.get("auc")
        if mean is not None and errors and None not in errors:  # a hospital without an interval: none for the mean
            se = math.sqrt(sum(e * e for e in errors if e is not None)) / len(errors)
            found["auc_se"], found["auc_ci_low"], found["auc_ci_high"] = se, mean - 1.96 * se, mean + 1.96 * se
    return found
