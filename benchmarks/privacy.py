"""What differential privacy costs in accuracy: the same federated run with and without DP-SGD, side by side.

For each generator seed (the acceptance data: 5 hospitals x 4000 patient-days, seeds 7, 8 and 9), the run
`train --mode federated` starts (FedAvg, 20 rounds of 1 local epoch) is trained without privacy and with each
budget ε (δ = 1e-5 for the whole run at every hospital, DP-SGD with its own defaults: batch 512, learning rate
0.01, clipping norm 1). The final global model is scored by its overall AUC on every hospital's test rows; the ε
column is what the run spent (the largest over hospitals, by Opacus' RDP accountant) and the noise multiplier the
one planned to meet the budget. The in-memory core runs it (the coordinator and the hospitals' code, no HTTP).

Run with `make bench` (or `python benchmarks/privacy.py [--seeds 7 8 9] [--epsilons 1 3 8]`); writes
benchmarks/results/privacy.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from health_mlops.config import get_settings
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import HospitalSplit, split_hospitals
from health_mlops.data.synthetic import generate_dataset
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.privacy_budget import privacy_report
from health_mlops.fl.run_config import PrivacyConfig, federated_run_config
from health_mlops.spec import DatasetSpec, load_spec

DELTA = 1e-5
TOLERANCE = 0.05  # acceptance: a private run within 0.05 AUC of the non-private one
RESULT = Path(__file__).parent / "results" / "privacy.md"


def acceptance_splits(spec: DatasetSpec, seed: int) -> list[HospitalSplit]:
    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="health-mlops-privacy-") as scratch:
        generate_dataset(Path(scratch), n_hospitals=5, rows_per_hospital=4000, seed=seed,
                         split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                         stratify=settings.stratified_split)
        hospitals = load_hospitals(Path(scratch), spec)
    return split_hospitals(hospitals, spec, seed=settings.split_seed, test_fraction=settings.test_fraction,
                           stratify=settings.stratified_split)


def train(spec: DatasetSpec, splits: list[HospitalSplit], epsilon: float | None) -> tuple[float, float | None,
                                                                                           float | None]:
    """(overall AUC, ε spent, noise multiplier) of the run `train --mode federated [--dp-epsilon ε]` starts."""
    privacy = None if epsilon is None else PrivacyConfig(epsilon=epsilon, delta=DELTA)
    config = federated_run_config(spec, len(splits), privacy=privacy)
    result, run = run_federated_in_memory(spec, splits, config)
    report = privacy_report(run)
    if report is None:
        return result.overall[spec.primary_metric], None, None
    noise = max(h["noise_multiplier"] for h in report["hospitals"].values())
    return result.overall[spec.primary_metric], report["epsilon"], noise


def markdown(rows: list[list[str]], header: Sequence[str], seeds: Sequence[int], minutes: float) -> str:
    lines = ["# Privacy benchmark", "",
             f"`python benchmarks/privacy.py` (`make bench`): 5 hospitals x 4000 rows, generator seeds "
             f"{', '.join(map(str, seeds))}, FedAvg, 20 rounds; DP-SGD at every hospital with δ = {DELTA:g} for the "
             f"whole run. Overall test AUC; Δ = private - non-private on the same seed. {minutes:.1f} min on 2 CPUs.",
             "", "| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in
                                                                 range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9], help="generator seeds of the data")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="budgets to compare")
    parser.add_argument("--out", type=Path, default=RESULT, help="markdown result")
    args = parser.parse_args()
    torch.set_num_threads(get_settings().torch_threads)
    spec = load_spec("health-risk")
    console = Console(width=160)
    header = ["seed", "privacy", "AUC", "Δ AUC", "ε spent", "noise multiplier"]
    rows: list[list[str]] = []
    deltas: dict[float, list[float]] = {e: [] for e in args.epsilons}
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task("runs", total=len(args.seeds) * (1 + len(args.epsilons)))
        for seed in args.seeds:
            splits = acceptance_splits(spec, seed)
            progress.update(bar, description=f"seed {seed} without privacy")
            plain, _, _ = train(spec, splits, None)
            progress.advance(bar)
            rows.append([str(seed), "none", f"{plain:.4f}", "", "", ""])
            for epsilon in args.epsilons:
                progress.update(bar, description=f"seed {seed} ε = {epsilon:g}")
                auc, spent, noise = train(spec, splits, epsilon)
                progress.advance(bar)
                deltas[epsilon].append(auc - plain)
                rows.append([str(seed), f"ε ≤ {epsilon:g}", f"{auc:.4f}", f"{auc - plain:+.4f}", f"{spent:.3f}",
                             f"{noise:.2f}"])
    minutes = (time.perf_counter() - started) / 60
    for epsilon, found in deltas.items():
        rows.append(["mean", f"ε ≤ {epsilon:g}", "", f"{statistics.mean(found):+.4f}", "",
                     f"worst {min(found):+.4f}" + ("" if min(found) >= -TOLERANCE else f" (beyond {TOLERANCE})")])
    table = Table(title="Differential privacy: overall AUC against the same run without it")
    for name in header:
        table.add_column(name, justify="left" if name in ("seed", "privacy") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"{len(args.seeds) * (1 + len(args.epsilons))} runs in {minutes:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, header, args.seeds, minutes))
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
