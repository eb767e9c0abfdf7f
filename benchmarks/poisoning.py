"""Robustness to a poisoning hospital: one of five hospitals sends a poisoned update in every fit round.

For each generator seed (the acceptance data: 5 hospitals x 4000 patient-days, seeds 7, 8 and 9) and each strategy
(fedavg, median, trimmed_mean), the same federated run is trained clean and under three attacks by hospital-1;
the final global model is scored by its overall AUC on every hospital's test rows
(`health_mlops.experiments.simulation.score_global_model`). The attacker trains honestly, then replaces its update
(delta = its local weights - the round's global weights) before sending it:

  sign_flip  its honest delta negated and amplified x10: global - 10 (local - global)
  scaled     its honest delta amplified x1000: global + 1000 (local - global)
  random     a random Gaussian direction (seeded by data seed and round): global + noise
Every poisoned delta is clipped to at most 99 % of the run's `update_norm_bound` (L2, default 100; the coordinator
refuses an update farther than the bound, so the attack stays just inside and is accepted). scaled and random
therefore send norm 99 every round; sign_flip, x10 of an honest delta of norm ~0.5, sends ~5 and is not clipped.
The attacker reports its example count honestly (the coordinator refuses more than it counted in round 0).
The benchmark checks that the coordinator refused nothing: every poisoned update was averaged.

Training settings are those of `train --mode federated` (the training defaults, 20 rounds of 1 local epoch;
strategies with their default settings: trimmed_mean cuts 20 % of 5 = 1 update from each end per weight).
The in-memory core runs it (coordinator and hospitals called directly, no HTTP): the 36 runs (3 seeds x
3 strategies x clean + 3 attacks) take about 2 minutes on 2 cores, so the default 20 rounds are kept.

Run with `make bench` (or `python benchmarks/poisoning.py [--seeds 7 8 9] [--rounds 20]`); writes
benchmarks/results/poisoning.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from health_mlops.config import get_federation_defaults, get_settings
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import HospitalSplit, split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.run_config import RunConfig, StrategyName, federated_run_config
from health_mlops.fl.strategies import Weights
from health_mlops.spec import DatasetSpec, load_spec

Attack = Literal["sign_flip", "scaled", "random"]
ATTACKS: tuple[Attack, ...] = get_args(Attack)
STRATEGIES: tuple[StrategyName, ...] = ("fedavg", "median", "trimmed_mean")
ATTACKER = "hospital-1"
SIGN_FLIP_BOOST = 10.0  # the flipped delta, amplified: it outweighs the four honest hospitals under FedAvg
SCALE = 1000.0  # the scaled attack's factor; clipping to the bound is what limits it
BOUND_SHARE = 0.99  # of update_norm_bound: just inside, with room for float32 rounding
TOLERANCE = 0.02  # acceptance: a robust strategy within 0.02 AUC of its clean run, for each attack
RESULT = Path(__file__).parent / "results" / "poisoning.md"


def delta_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all tensors, as `validate_update` measures an update's distance to the global model."""
    return math.sqrt(sum(float(np.sum(np.asarray(d, dtype=np.float64) ** 2)) for d in delta.values()))


def clipped(delta: Mapping[str, np.ndarray], max_norm: float) -> Weights:
    """`delta` scaled down to norm `max_norm` if it is longer; unchanged otherwise."""
    norm = delta_norm(delta)
    factor = max_norm / norm if norm > max_norm else 1.0
    return {name: factor * np.asarray(d, dtype=np.float64) for name, d in delta.items()}


def poisoned_update(attack: Attack, global_weights: Mapping[str, np.ndarray], honest: Mapping[str, np.ndarray], *,
                    norm_bound: float, rng: np.random.Generator) -> Weights:
    """The weights an attacker sends instead of its honest `honest` ones; within 99 % of `norm_bound` of the global
    model, in the honest tensors' dtypes."""
    delta = {n: np.asarray(honest[n], dtype=np.float64) - np.asarray(global_weights[n], dtype=np.float64)
             for n in global_weights}
    budget = BOUND_SHARE * norm_bound
    if attack == "sign_flip":
        bad = clipped({n: -SIGN_FLIP_BOOST * d for n, d in delta.items()}, budget)
    elif attack == "scaled":
        bad = clipped({n: SCALE * d for n, d in delta.items()}, budget)
    elif attack == "random":
        noise = {n: rng.standard_normal(d.shape) for n, d in delta.items()}
        length = delta_norm(noise)
        bad = {n: (budget / length) * v for n, v in noise.items()}
    else:
        raise ValueError(f"unknown attack {attack!r}")
    return {n: (np.asarray(global_weights[n], dtype=np.float64) + bad[n]).astype(np.asarray(honest[n]).dtype)
            for n in global_weights}


@dataclass
class PoisoningWorker(HospitalWorker):
    """A hospital that trains honestly, then sends a poisoned update in every fit round (metadata untouched)."""

    attack: Attack = "sign_flip"
    seed: int = 0  # of the random attack's noise, with the round number
    sent_norms: list[float] = field(default_factory=list)  # L2 norm of each poisoned delta it sent

    def handle(self, kind: TaskKind, config: RunConfig, weights: Weights, preprocessing: dict[str, Any],
               round_number: int) -> TaskResult:
        result = super().handle(kind, config, weights, preprocessing, round_number)
        if kind is TaskKind.fit:
            rng = np.random.default_rng([self.seed, round_number])
            result.tensors = poisoned_update(self.attack, weights, result.tensors,
                                             norm_bound=config.update_norm_bound, rng=rng)
            self.sent_norms.append(delta_norm({n: result.tensors[n].astype(np.float64) - weights[n]
                                               for n in weights}))
        return result


def run_config(spec: DatasetSpec, strategy: StrategyName, rounds: int) -> RunConfig:
    """The run `train --mode federated --strategy S` starts over 5 hospitals."""
    return federated_run_config(spec, 5, rounds=rounds, strategy=strategy)


def final_auc(spec: DatasetSpec, splits: list[HospitalSplit], config: RunConfig, attack: Attack | None,
              seed: int) -> tuple[float, list[float]]:
    """Overall test AUC of the final global model, and the norms of the poisoned deltas sent; fails if the
    coordinator refused any update."""
    overrides: dict[str, HospitalWorker] = {}
    if attack is not None:
        split = next(s for s in splits if s.hospital_id == ATTACKER)
        overrides[ATTACKER] = PoisoningWorker(ATTACKER, spec, split.train, split.test, attack=attack, seed=seed)
    result, run = run_federated_in_memory(spec, splits, config, worker_overrides=overrides)
    if run.rejected:
        raise RuntimeError(f"the coordinator refused updates ({run.rejected}): the attack must stay accepted")
    attacker = overrides.get(ATTACKER)
    return float(result.overall["auc"]), attacker.sent_norms if isinstance(attacker, PoisoningWorker) else []


@dataclass(frozen=True)
class Row:
    strategy: StrategyName
    attack: Attack | None  # None: the clean run
    auc: dict[int, float]  # generator seed -> final overall AUC
    clean: dict[int, float]  # the same strategy's clean run

    def deltas(self) -> list[float]:
        return [self.auc[s] - self.clean[s] for s in self.auc]

    def cells(self, seeds: Sequence[int]) -> list[str]:
        mean, clean_mean = statistics.mean(self.auc.values()), statistics.mean(self.clean.values())
        per_seed = [f"{self.auc[s]:.4f}" if self.attack is None else
                    f"{self.auc[s]:.4f} ({self.auc[s] - self.clean[s]:+.4f})" for s in seeds]
        if self.attack is None:
            return [self.strategy, "none (clean)", *per_seed, f"{mean:.4f}", "", "", "", ""]
        worst = min(self.deltas())
        verdict = "yes" if worst >= -TOLERANCE else "no"
        return [self.strategy, self.attack, *per_seed, f"{mean:.4f}", f"{mean - clean_mean:+.4f}", f"{worst:+.4f}",
                f"{mean / clean_mean:.3f}", verdict]


def headers(seeds: Sequence[int]) -> list[str]:
    return ["strategy", "attack", *(f"seed {s}" for s in seeds), "mean AUC", "Δ mean", "worst Δ", "mean / clean",
            f"within {TOLERANCE}"]


def summary(rows: list[Row]) -> list[str]:
    lines = []
    for attack in ATTACKS:
        attacked = {r.strategy: r for r in rows if r.attack == attack}
        robust = [s for s in ("median", "trimmed_mean") if min(attacked[s].deltas()) >= -TOLERANCE]
        fedavg = attacked["fedavg"]
        lines.append(f"{attack}: fedavg loses **{-statistics.mean(fedavg.deltas()):.4f}** AUC on average "
                     f"(worst seed {-min(fedavg.deltas()):.4f}); within {TOLERANCE} of the clean run on every seed: "
                     f"**{', '.join(robust) if robust else 'neither median nor trimmed_mean'}**")
    return lines


def norms_line(norms: Mapping[Attack, list[float]], bound: float) -> str:
    return (f"L2 norm of the poisoned deltas sent (median over rounds and runs; refused above {bound:g}): "
            + ", ".join(f"{a} {statistics.median(norms[a]):.2f}" for a in ATTACKS))


def markdown(rows: list[Row], seeds: Sequence[int], rounds: int, minutes: float, norms: str) -> str:
    names = headers(seeds)
    lines = ["# Poisoning benchmark", "",
             f"`python benchmarks/poisoning.py` (`make bench`): 5 hospitals x 4000 rows, generator seeds "
             f"{', '.join(map(str, seeds))}, {rounds} rounds, {os.cpu_count()} CPUs; {ATTACKER} poisons every fit "
             f"round (sign_flip: "
             f"-{SIGN_FLIP_BOOST:g}x its honest delta; scaled: {SCALE:g}x; random: Gaussian direction; each clipped "
             f"to at most {BOUND_SHARE:g} x update_norm_bound, all accepted). Final overall test AUC; "
             f"in brackets the change from the same strategy's clean run on that seed. {minutes:.1f} min.", "",
             "| " + " | ".join(names) + " |",
             "|---|---|" + "---:|" * (len(names) - 2)]
    lines += ["| " + " | ".join(row.cells(seeds)) + " |" for row in rows]
    lines += [""] + [f"- {line}" for line in [*summary(rows), norms]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9], help="generator seeds of the data")
    parser.add_argument("--rounds", type=int, default=get_federation_defaults().rounds)
    parser.add_argument("--out", type=Path, default=RESULT, help="markdown result")
    args = parser.parse_args()
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    spec = load_spec("health-risk")
    console = Console(width=160)
    conditions: list[Attack | None] = [None, *ATTACKS]
    auc: dict[tuple[StrategyName, Attack | None], dict[int, float]] = {}
    norms: dict[Attack, list[float]] = {attack: [] for attack in ATTACKS}
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("runs", total=len(args.seeds) * len(STRATEGIES) * len(conditions))
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="health-mlops-poisoning-") as scratch:
                generate_dataset(Path(scratch), n_hospitals=5, rows_per_hospital=4000, seed=seed,
                                 split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                                 stratify=settings.stratified_split)
                hospitals = load_hospitals(Path(scratch), spec)
                splits = split_hospitals(hospitals, spec, seed=settings.split_seed,
                                         test_fraction=settings.test_fraction, stratify=settings.stratified_split)
            for strategy in STRATEGIES:
                config = run_config(spec, strategy, args.rounds)
                for attack in conditions:
                    progress.update(bar, description=f"seed {seed} {strategy} {attack or 'clean'}")
                    score, sent = final_auc(spec, splits, config, attack, seed)
                    auc.setdefault((strategy, attack), {})[seed] = score
                    if attack is not None:
                        norms[attack] += sent
                    progress.advance(bar)
    minutes = (time.perf_counter() - started) / 60
    rows = [Row(strategy, attack, auc[strategy, attack], auc[strategy, None])
            for strategy in STRATEGIES for attack in conditions]

    table = Table(title=f"Final overall AUC, {ATTACKER} of 5 poisoning every round, {args.rounds} rounds "
                        f"(Δ: attacked - clean, same seed)")
    for name in headers(args.seeds):
        table.add_column(name, justify="left" if name in ("strategy", "attack") else "right")
    for row in rows:
        table.add_row(*row.cells(args.seeds), end_section=row.attack == ATTACKS[-1])
    console.print(table)
    bound = run_config(spec, STRATEGIES[0], args.rounds).update_norm_bound
    for line in summary(rows):
        console.print(line.replace("**", ""))
    console.print(norms_line(norms, bound))
    console.print(f"{len(args.seeds) * len(STRATEGIES) * len(conditions)} runs in {minutes:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, args.seeds, args.rounds, minutes, norms_line(norms, bound)))
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
