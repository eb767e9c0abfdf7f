"""Claims over seeds: pooled, local-only and federated training on the synthetic data of several generator seeds
(each with its own split seed), scored per hospital, summarised as mean ± standard deviation over seeds.

One seed is an anecdote: a hospital's test split holds a few dozen events, so its AUC moves by a few hundredths
from one draw to the next. The README's accuracy claims come from here, stated in the form that holds: on
average over seeds, the federated model's mean AUC over hospitals is within 0.01 of pooled training, and at
every hospital it is at least what the hospital reaches alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset, read_reference
from health_mlops.experiments.baselines import run_local, run_pooled
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.run_config import RunConfig
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import load_spec

MODES = ("federated", "pooled", "local", "bayes")
POOLED_MARGIN = 0.01  # the federated mean AUC may trail pooled training by this much, on average over seeds


@dataclass(frozen=True)
class SeedScores:
    """One seed's AUC per mode: per hospital and the mean over hospitals."""

    seed: int
    per_hospital: dict[str, dict[str, float | None]]  # mode -> hospital -> AUC
    mean_over_hospitals: dict[str, float | None]  # mode -> mean AUC


def _auc(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def score_seed(seed: int, workdir: Path, *, hospitals: int, rows_per_hospital: int, test_fraction: float,
               stratify: bool, train_config: TrainConfig, run_config: RunConfig) -> SeedScores:
    """Generate seed `seed`'s data (split seed = `seed`) and train all three ways on it."""
    spec = load_spec("health-risk")
    folder = workdir / f"seed-{seed}"
    generate_dataset(folder, n_hospitals=hospitals, rows_per_hospital=rows_per_hospital, seed=seed,
                     split_seed=seed, test_fraction=test_fraction, stratify=stratify)
    splits = split_hospitals(load_hospitals(folder, spec), spec, seed=seed, test_fraction=test_fraction,
                             stratify=stratify)
    results: dict[str, dict[str, Any]] = {"pooled": run_pooled(spec, splits, train_config).to_json(),
               "local": run_local(spec, splits, train_config).to_json(),
               "federated": run_federated_in_memory(spec, splits, run_config, seed=seed)[0].to_json()}
    reference = read_reference(folder, split_seed=seed, test_fraction=test_fraction, stratify=stratify)
    assert reference is not None  # generated just now with this split
    results["bayes"] = reference
    per_hospital = {mode: {h: _auc(m["auc"]) for h, m in r["per_hospital"].items()} for mode, r in results.items()}
    mean = {mode: _auc(r["mean_over_hospitals"]["auc"]) for mode, r in results.items()}
    return SeedScores(seed, per_hospital, mean)


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

    def claims(self) -> dict[str, bool]:
        """The README's two claims, checked on these seeds (means over seeds)."""
        federated, pooled = self.mean_summary("federated")[0], self.mean_summary("pooled")[0]
        close_to_pooled = federated is not None and pooled is not None and federated >= pooled - POOLED_MARGIN
        no_hospital_worse = True
        for hospital in self.hospitals:
            fed, local = self.hospital_summary("federated", hospital)[0], self.hospital_summary("local", hospital)[0]
            no_hospital_worse &= fed is not None and (local is None or fed >= local)
        return {"federated_within_0.01_of_pooled": close_to_pooled,
                "federated_at_least_local_at_every_hospital": no_hospital_worse}

    def to_json(self) -> dict[str, object]:
        def summary(values: tuple[float | None, float | None, int]) -> dict[str, object]:
            return {"mean": values[0], "sd": values[1], "seeds": values[2]}

        return {"seeds": [s.seed for s in self.seeds],
                "per_hospital": {h: {m: summary(self.hospital_summary(m, h)) for m in MODES} for h in self.hospitals},
                "mean_over_hospitals": {m: summary(self.mean_summary(m)) for m in MODES},
                "claims": self.claims(),
                "per_seed": [{"seed": s.seed, "per_hospital": s.per_hospital,
                              "mean_over_hospitals": s.mean_over_hospitals} for s in self.seeds]}


def evaluate_over_seeds(seeds: list[int], workdir: Path, *, hospitals: int, rows_per_hospital: int,
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
