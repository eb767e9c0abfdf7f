"""Training to convergence on any site size: the table that chose the training defaults.

For each candidate setting and each data set, pooled, local-only and federated training (20 FedAvg rounds, the
in-memory core: the services' coordinator and hospital code, no HTTP) over seeds 1 to 5, each seed its own data
(health-risk: the generator's seed) and split. Data sets: health-risk with 5 hospitals x 150, x 300 and x 4000
patient-days (20 % of each hospital's rows are its test split: 30, 60 and 800 rows), and scikit-learn's diabetes
data (442 patients, 5 sites by age band, 53 to 115 patients; a regression, scored by R²).

Columns: the primary metric's mean over hospitals, averaged over the seeds, for each way of training; the
federated model's Brier score (its mean over hospitals: calibration and discrimination together); and
"one class": how many (hospital, seed) pairs, over all three ways of training, whose test rows hold both
outcomes, where a model flags every patient or none at its threshold.

Candidates:
  defaults         the training defaults (`TrainingDefaults`): a budget of 4000 optimiser steps pooled and
                   local-only, 200 a round at each hospital federated, batch 64, learning rate 0.001, weight decay
                   0.01 on up to 4000 training rows, shrinking as 1 / rows above (a federation's: over all its
                   hospitals; `ml.train_config.WEIGHT_DECAY_FULL_ROWS`); each hospital holds out 20 % of its
                   training rows to stop early (patience 10 checks) and to choose the federation's best round
  weight decay 0.01 on every site  the former weight decay, whole whatever the site's size
  weight decay 0.01 up to 250 rows  the decay shrinking from 250 rows on
  weight decay 1e-3  a tenth of the default's
  2000 steps, 100 a round  half the defaults' budget (pooled, local-only and a federated round): the former one
  former           the former defaults: 8 epochs pooled and local-only, 1 epoch a round federated, weight decay
                   0.001 on every site, no validation rows (every model trained to the end of its budget);
                   diabetes's spec then asked for 200 epochs at learning rate 0.01 in batches of 32, which this row
                   does not redo

Run with `make bench` (or `python benchmarks/convergence.py [--seeds 1 2 3 4 5]`): prints the table and writes
benchmarks/results/convergence.md (about 20 minutes on 2 CPUs: one process a CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from health_mlops.config import get_training_defaults
from health_mlops.data.diabetes import write_diabetes_sites
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.baselines import run_local, run_pooled
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.run_config import federated_run_config
from health_mlops.ml import train_config
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import load_spec

MODES = ("federated", "pooled", "local")


@dataclass(frozen=True)
class Candidate:
    name: str
    local: dict[str, Any]  # TrainConfig overrides (pooled and local-only)
    federated: dict[str, Any]  # federated_run_config overrides
    decay_full_rows: int = train_config.WEIGHT_DECAY_FULL_ROWS  # a site of up to so many rows: whole decay


EVERY_SITE = sys.maxsize
CANDIDATES = (
    Candidate("defaults", {}, {}),
    Candidate("weight decay 0.01 on every site", {}, {}, decay_full_rows=EVERY_SITE),
    Candidate("weight decay 0.01 up to 250 rows", {}, {}, decay_full_rows=250),
    Candidate("weight decay 1e-3", {"weight_decay": 1e-3}, {"weight_decay": 1e-3}),
    Candidate("2000 steps, 100 a round", {"max_steps": 2000}, {"local_steps": 100}),
    Candidate("former", {"epochs": 8, "weight_decay": 1e-3, "validation_fraction": 0.0},
              {"local_epochs": 1, "weight_decay": 1e-3, "validation_fraction": 0.0}, decay_full_rows=EVERY_SITE),
)
DATA_SETS = (("health-risk", 150), ("health-risk", 300), ("health-risk", 4000), ("diabetes", 0))


@dataclass
class Cell:
    metric: dict[str, list[float]]
    brier: list[float]
    one_class: int = 0


def one_class(per_hospital: dict[str, dict[str, Any]]) -> int:
    """Hospitals whose test rows hold both outcomes (an AUC) where the model flags all patients or none."""
    return sum(1 for m in per_hospital.values() if m.get("auc") is not None
               and {m["sensitivity"], m["specificity"]} == {0.0, 1.0})


def measure(name: str, rows: int, seed: int, candidate: Candidate) -> Cell:
    """One seed of one candidate on one data set (run in a worker process of its own)."""
    torch.set_num_threads(1)
    spec = load_spec(name)
    cell = Cell({mode: [] for mode in MODES}, [])
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        if spec.name == "diabetes":
            write_diabetes_sites(data)
        else:
            generate_dataset(data, n_hospitals=5, rows_per_hospital=rows, seed=seed, split_seed=seed,
                             test_fraction=0.2)
        splits = split_hospitals(load_hospitals(data, spec), spec, seed=seed, test_fraction=0.2)
    local = TrainConfig.for_task(get_training_defaults(), spec, seed=seed, **candidate.local)
    run = federated_run_config(spec, len(splits), seed=seed, **candidate.federated)
    with mock.patch.object(train_config, "WEIGHT_DECAY_FULL_ROWS", candidate.decay_full_rows):
        results = {"pooled": run_pooled(spec, splits, local), "local": run_local(spec, splits, local),
                   "federated": run_federated_in_memory(spec, splits, run, seed=seed)[0]}
    for mode, result in results.items():
        document = result.to_json()
        cell.metric[mode].append(document["mean_over_hospitals"][spec.primary_metric])
        if spec.task == "binary":
            cell.one_class += one_class(document["per_hospital"])
            if mode == "federated":
                cell.brier.append(document["mean_over_hospitals"]["brier"])
    return cell


def markdown(table: dict[tuple[str, str, int], Cell], seeds: list[int], minutes: float) -> str:
    lines = [f"Seeds {seeds[0]}–{seeds[-1]}, 5 hospitals, 20 federated rounds ({minutes:.0f} min on this machine; "
             "`python benchmarks/convergence.py`). AUC (diabetes: R²) as the mean over hospitals, averaged over "
             "seeds; one class: (hospital, seed) pairs flagging all or none, over the three ways of training.", "",
             "| setting | data | federated | pooled | local-only | federated − pooled | federated Brier | one class |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (candidate, name, rows), cell in table.items():
        means = {mode: float(np.mean(cell.metric[mode])) for mode in MODES}
        brier = f"{np.mean(cell.brier):.4f}" if cell.brier else "–"
        label = f"{name} × {rows}" if rows else name
        lines.append(f"| {candidate} | {label} | {means['federated']:.3f} | {means['pooled']:.3f} | "
                     f"{means['local']:.3f} | {means['federated'] - means['pooled']:+.3f} | {brier} | "
                     f"{cell.one_class if cell.brier else '–'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convergence.md")
    args = parser.parse_args()
    started = time.perf_counter()
    table: dict[tuple[str, str, int], Cell] = {}
    jobs: dict[tuple[str, str, int], list[Any]] = {}
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for candidate in CANDIDATES:
            for name, rows in DATA_SETS:
                seeds = [pool.submit(measure, name, rows, seed, candidate) for seed in args.seeds]
                table[(candidate.name, name, rows)] = Cell({mode: [] for mode in MODES}, [])
                jobs[(candidate.name, name, rows)] = seeds
        for key, seeds in jobs.items():
            cell = table[key]
            for job in seeds:
                found = job.result()
                for mode in MODES:
                    cell.metric[mode] += found.metric[mode]
                cell.brier += found.brier
                cell.one_class += found.one_class
            print(markdown({key: cell}, args.seeds, 0).splitlines()[-1], flush=True)
    text = markdown(table, args.seeds, (time.perf_counter() - started) / 60)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
