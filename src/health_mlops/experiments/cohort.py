"""Every model scored on each hospital's independent cohort: the synthetic generator's later patient-days of the
same city, never trained on (`data.synthetic.generate_cohort`).

A hospital's test split holds a few dozen events, so its AUC moves by a tenth from one draw to the next and a table
of them is noise. The cohort holds 20000 patient-days a hospital: each model's AUC there has an interval of a few
hundredths, and the difference between two models scored on the same patients (a paired bootstrap: the same
resamples for both) one of a few thousandths. The Bayes-optimal risk (the generator's true risk of each row) is
scored on the same rows: no model can beat it but by chance.

Over several seeds, each seed's resamples are averaged replicate by replicate, so the interval is that of the mean
over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from health_mlops.metrics import resample_counts, weighted_auc

COHORT_MODES = ("federated", "pooled", "local-only", "Bayes-optimal")
COHORT_REPLICATES = 200
# A hospital with fewer training patient-days than this cannot train a model of its own worth using: the
# federation must do better for it than it does alone, beyond the interval.
SMALL_HOSPITAL_ROWS = 1000
# Federated within this of pooled training on the mean AUC over hospitals (on the cohort, means over seeds).
COHORT_POOLED_MARGIN = 0.005
_SEED = 0  # the resamples' seed: the same for every model of a hospital, which is what pairs them


@dataclass(frozen=True)
class CohortScores:
    """Each mode's AUC on each hospital's cohort, with the bootstrap replicates behind its interval."""

    rows_per_hospital: dict[str, int]  # the hospital's own patient-days (what it trains on, with its test split)
    cohort_rows: dict[str, int]
    auc: dict[str, dict[str, float]]  # mode -> hospital -> AUC
    replicates: dict[str, dict[str, np.ndarray]]  # mode -> hospital -> AUC of each resample (paired across modes)

    @property
    def hospitals(self) -> list[str]:
        return list(self.rows_per_hospital)

    def interval(self, mode: str, hospital: str) -> tuple[float, float]:
        return _percentiles(self.replicates[mode][hospital])

    def difference(self, mode: str, other: str, hospital: str) -> tuple[float, float, float]:
        """(AUC of `mode` − AUC of `other`, and its 95 % interval) at `hospital`, on the same patients."""
        low, high = _percentiles(self.replicates[mode][hospital] - self.replicates[other][hospital])
        return self.auc[mode][hospital] - self.auc[other][hospital], low, high

    def mean_over_hospitals(self, mode: str) -> float:
        return float(np.mean([self.auc[mode][h] for h in self.hospitals]))

    def claims(self) -> dict[str, bool]:
        """The cohort's claims: the federation within 0.005 of pooled training on the mean AUC over hospitals; at no
        hospital below local-only beyond the interval; above it beyond the interval at every hospital too small to
        train alone; and no model above the Bayes-optimal risk beyond the interval."""
        small = [h for h in self.hospitals if self.rows_per_hospital[h] < SMALL_HOSPITAL_ROWS]
        return {
            "cohort_federated_within_0.005_of_pooled":
                self.mean_over_hospitals("federated") >= self.mean_over_hospitals("pooled") - COHORT_POOLED_MARGIN,
            "cohort_federated_not_below_local_anywhere":
                all(self.difference("federated", "local-only", h)[2] >= 0 for h in self.hospitals),
            "cohort_federated_above_local_at_small_hospitals":
                all(self.difference("federated", "local-only", h)[1] > 0 for h in small),
            "cohort_no_model_above_bayes":
                all(self.difference(mode, "Bayes-optimal", h)[1] <= 0
                    for mode in COHORT_MODES[:-1] for h in self.hospitals),
        }

    def to_json(self) -> dict[str, object]:
        """Shaped like a comparison's columns (`per_hospital.<h>.auc`, `.auc_ci`, `mean_over_hospitals.auc`), with
        the paired differences that the claims read."""
        document: dict[str, object] = {"rows_per_hospital": self.rows_per_hospital, "cohort_rows": self.cohort_rows}
        for mode in COHORT_MODES:
            document[mode] = {"per_hospital": {h: {"auc": self.auc[mode][h], "auc_ci": list(self.interval(mode, h))}
                                               for h in self.hospitals},
                              "mean_over_hospitals": {"auc": self.mean_over_hospitals(mode)}}
        document["differences"] = {
            f"{mode} - {other}": {h: dict(zip(("auc", "low", "high"), self.difference(mode, other, h), strict=True))
                                  for h in self.hospitals}
            for mode, other in (("federated", "local-only"), ("federated", "pooled"))}
        document["claims"] = self.claims()
        return document


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    defined = values[np.isfinite(values)]
    if len(defined) == 0:
        return math.nan, math.nan
    low, high = np.percentile(defined, [2.5, 97.5])
    return float(low), float(high)


def cohort_rows_of(cohort: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every hospital's cohort in one frame of features (hospital by hospital, in order), for models to predict."""
    return pd.concat([frame.drop(columns=["_risk"]) for frame in cohort.values()], ignore_index=True)


def score_on_cohort(cohort: Mapping[str, pd.DataFrame], rows_per_hospital: Mapping[str, int], target: str, *,
                    federated: np.ndarray, pooled: np.ndarray, local: Sequence[np.ndarray]) -> CohortScores:
    """Each model's predictions on `cohort_rows_of(cohort)` scored hospital by hospital: the federated and pooled
    models' for every hospital, each hospital's local-only model's for its own (`local`, in the cohort's order)."""
    auc: dict[str, dict[str, float]] = {mode: {} for mode in COHORT_MODES}
    replicates: dict[str, dict[str, np.ndarray]] = {mode: {} for mode in COHORT_MODES}
    start = 0
    for index, (hospital, frame) in enumerate(cohort.items()):
        rows = slice(start, start + len(frame))
        start += len(frame)
        y = frame[target].astype(int).to_numpy()
        predictions = {"federated": federated[rows], "pooled": pooled[rows], "local-only": local[index][rows],
                       "Bayes-optimal": frame["_risk"].to_numpy()}
        resamples = resample_counts(len(y), COHORT_REPLICATES, _SEED)  # drawn once: every model on the same ones
        for mode, p in predictions.items():
            auc[mode][hospital] = float(weighted_auc(y, p, np.ones((1, len(y))))[0])
            replicates[mode][hospital] = np.concatenate([weighted_auc(y, p, counts) for counts in resamples])
    return CohortScores(dict(rows_per_hospital), {h: len(f) for h, f in cohort.items()}, auc, replicates)


def mean_over_seeds(scores: Sequence[CohortScores]) -> CohortScores:
    """The seeds' AUCs averaged hospital by hospital, and their resamples replicate by replicate: the scores of the
    mean over seeds, with its interval."""
    first = scores[0]
    return CohortScores(
        first.rows_per_hospital, first.cohort_rows,
        {mode: {h: float(np.mean([s.auc[mode][h] for s in scores])) for h in first.hospitals} for mode in first.auc},
        {mode: {h: np.mean([s.replicates[mode][h] for s in scores], axis=0) for h in first.hospitals}
         for mode in first.replicates})
