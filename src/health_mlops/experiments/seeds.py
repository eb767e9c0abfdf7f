"""Claims over seeds: pooled, local-only and federated training on the synthetic data of several generator seeds
(each with its own split seed), scored per hospital, summarised as mean ± standard deviation over seeds.

One seed is an anecdote, and a hospital's test split a small sample: it holds a few dozen events, so its AUC moves
by a few hundredths from one draw to the next. Each seed's models are therefore also scored on every hospital's
independent cohort (`experiments.cohort`: 20000 later patient-days of its city), and the README's accuracy claims
are the cohort's, on the mean over seeds with its interval: the federated model within 0.005 of pooled training on
the mean AUC over hospitals, nowhere below local-only beyond the interval, above it beyond the interval at every
hospital too small to train alone, and no model above the Bayes-optimal risk beyond the interval.

Test patients are patients like the training ones; a model is also asked about patients unlike any it saw. Each
seed's models also score patients drawn uniformly across the spec's ranges, and the rank correlation (Spearman) of
their risk with the generator's true risk says whether the risk still moves as the patient's state does there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_cohort, generate_dataset, read_reference, sizes_of, true_risk
from health_mlops.experiments.baselines import run_local, run_pooled
from health_mlops.experiments.cohort import CohortScores, cohort_rows_of, mean_over_seeds, score_on_cohort
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.run_config import RunConfig
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec, load_spec

MODES = ("federated", "pooled", "local", "bayes")
TRAINED_MODES = ("federated", "pooled", "local")
PROBE_PATIENTS = 2000  # patients drawn across the spec's ranges, each seed
RANK_TARGET = 0.6  # the federated risk's rank correlation with the true risk there, on average over seeds


@dataclass(frozen=True)
class SeedScores:
    """One seed's AUC per mode: per hospital and the mean over hospitals."""

    seed: int
    per_hospital: dict[str, dict[str, float | None]]  # mode -> hospital -> AUC
    mean_over_hospitals: dict[str, float | None]  # mode -> mean AUC
    # trained mode -> Spearman of the risk with the true risk on patients across the spec's ranges (local-only: the
    # mean over the hospitals' models)
    rank_correlation: dict[str, float]
    cohort: CohortScores


def _auc(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def patients_across_ranges(spec: DatasetSpec, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """`n` patients whose every feature is drawn uniformly: numeric ones over the spec's range, categories alike."""
    columns: dict[str, np.ndarray] = {}
    for feature in spec.features:
        if feature.type == "numeric":
            assert feature.min is not None and feature.max is not None, f"{feature.name} has no range in the spec"
            columns[feature.name] = rng.uniform(feature.min, feature.max, n)
        else:
            columns[feature.name] = rng.choice(list(feature.categories or ()), n)
    return pd.DataFrame(columns)


def score_seed(seed: int, workdir: Path, *, hospitals: int, rows_per_hospital: int | list[int],
               test_fraction: float, stratify: bool, train_config: TrainConfig, run_config: RunConfig) -> SeedScores:
    """Generate seed `seed`'s data (split seed = `seed`) and its cohort, and train all three ways on it."""
    spec = load_spec("health-risk")
    across = patients_across_ranges(spec, PROBE_PATIENTS, np.random.default_rng([seed, PROBE_PATIENTS]))
    cohort = generate_cohort(n_hospitals=hospitals, seed=seed)
    probe = pd.concat([across, cohort_rows_of(cohort)], ignore_index=True)  # one prediction pass per model
    folder = workdir / f"seed-{seed}"
    generate_dataset(folder, n_hospitals=hospitals, rows_per_hospital=rows_per_hospital, seed=seed,
                     split_seed=seed, test_fraction=test_fraction, stratify=stratify)
    splits = split_hospitals(load_hospitals(folder, spec), spec, seed=seed, test_fraction=test_fraction,
                             stratify=stratify)
    trained = {"pooled": run_pooled(spec, splits, train_config, probe=probe),
               "local": run_local(spec, splits, train_config, probe=probe),
               "federated": run_federated_in_memory(spec, splits, run_config, seed=seed, probe=probe)[0]}
    truth = true_risk(across)
    rank_correlation = {mode: float(np.mean([spearmanr(risk[:PROBE_PATIENTS], truth).statistic
                                             for risk in result.probe_predictions]))
                        for mode, result in trained.items()}
    sizes = dict(zip(cohort, sizes_of(hospitals, rows_per_hospital), strict=True))
    scored = score_on_cohort(cohort, sizes, spec.target.name,
                             federated=trained["federated"].probe_predictions[0][PROBE_PATIENTS:],
                             pooled=trained["pooled"].probe_predictions[0][PROBE_PATIENTS:],
                             local=[risk[PROBE_PATIENTS:] for risk in trained["local"].probe_predictions])
    results: dict[str, dict[str, Any]] = {mode: result.to_json() for mode, result in trained.items()}
    reference = read_reference(folder, split_seed=seed, test_fraction=test_fraction, stratify=stratify)
    assert reference is not None  # generated just now with this split
    results["bayes"] = reference
    per_hospital = {mode: {h: _auc(m["auc"]) for h, m in r["per_hospital"].items()} for mode, r in results.items()}
    mean = {mode: _auc(r["mean_over_hospitals"]["auc"]) for mode, r in results.items()}
    return SeedScores(seed, per_hospital, mean, rank_correlation, scored)


def mean_and_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, n) of the defined values."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None, None, 0
    return float(np.mean(defined)), float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0, len(defined)


@dataclass(frozen=True)
class SeedsEvaluation:
    seeds: list[SeedScores]

    @property
    def hospitals(self) -> list[str]:
        return list(self.seeds[0].per_hospital["federated"])

    def hospital_summary(self, mode: str, hospital: str) -> tuple[float | None, float | None, int]:
        return mean_and_sd([s.per_hospital[mode].get(hospital) for s in self.seeds])

    def mean_summary(self, mode: str) -> tuple[float | None, float | None, int]:
        return mean_and_sd([s.mean_over_hospitals[mode] for s in self.seeds])

    def rank_summary(self, mode: str) -> tuple[float | None, float | None, int]:
        return mean_and_sd([s.rank_correlation[mode] for s in self.seeds])

    @property
    def cohort(self) -> CohortScores:
        """The cohort's scores of the mean over seeds, with its intervals."""
        return mean_over_seeds([s.cohort for s in self.seeds])

    def claims(self) -> dict[str, bool]:
        """The claims of the evaluation (docs/evaluation.md), checked on these seeds: the cohort's on the mean over
        seeds, and the rank correlation across the spec's ranges on average over seeds."""
        ranked = self.rank_summary("federated")[0]
        return {**self.cohort.claims(),
                "federated_rank_correlation_at_least_0.6": ranked is not None and ranked >= RANK_TARGET}

    def to_json(self) -> dict[str, object]:
        def summary(values: tuple[float | None, float | None, int]) -> dict[str, object]:
            return {"mean": values[0], "sd": values[1], "seeds": values[2]}

        return {"seeds": [s.seed for s in self.seeds],
                "per_hospital": {h: {m: summary(self.hospital_summary(m, h)) for m in MODES} for h in self.hospitals},
                "mean_over_hospitals": {m: summary(self.mean_summary(m)) for m in MODES},
                "rank_correlation_across_ranges": {m: summary(self.rank_summary(m)) for m in TRAINED_MODES},
                "cohort": self.cohort.to_json(),
                "claims": self.claims(),
                "per_seed": [{"seed": s.seed, "per_hospital": s.per_hospital,
                              "mean_over_hospitals": s.mean_over_hospitals,
                              "rank_correlation_across_ranges": s.rank_correlation,
                              "cohort": {mode: s.cohort.auc[mode] for mode in s.cohort.auc}} for s in self.seeds]}


def evaluate_over_seeds(seeds: list[int], workdir: Path, *, hospitals: int, rows_per_hospital: int | list[int],
                        test_fraction: float, stratify: bool, train_config: TrainConfig, run_config: RunConfig,
                        on_seed: Callable[[int], None] | None = None) -> SeedsEvaluation:
    scores = []
    for seed in seeds:
        scores.append(score_seed(seed, workdir, hospitals=hospitals, rows_per_hospital=rows_per_hospital,
                                 test_fraction=test_fraction, stratify=stratify, train_config=train_config,
                                 run_config=run_config))
        if on_seed is not None:
            on_seed(seed)
    return SeedsEvaluation(scores)
