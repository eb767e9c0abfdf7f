"""What the federation protocol costs on top of the hospitals' compute, side by side in one run.

Four ways to train the same run (FedAvg, the acceptance data: 5 hospitals x 4000 patient-days, seed 7):
  in-memory   the coordinator and the hospitals called directly (no HTTP): the compute alone
  loopback    `train --mode federated`: aggregator and 5 node threads in one process over loopback, with
              mutual TLS as deployed, and with plain HTTP (`--plain-http`) to show what TLS costs
  processes   what `make demo` runs: the aggregator and 6 node processes (hospital-1 twice), mutual TLS
A round's overhead is its wall time minus its slowest hospital's compute (the hospitals work in parallel).

Run with `make bench` (or `python benchmarks/federation_overhead.py [--rounds R]`).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common import free_ports

from health_mlops.config import get_settings, get_training_defaults
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import split_hospitals
from health_mlops.data.synthetic import generate_dataset, hospital_ids
from health_mlops.demo.federation import Ports, run_federation
from health_mlops.demo.processes import Processes
from health_mlops.experiments.loopback import round_overheads_ms, run_federation_over_loopback
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.messages import RunRequest
from health_mlops.fl.run_config import RunConfig
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import provision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    spec = load_spec("health-risk")
    defaults = get_training_defaults()
    config = RunConfig(rounds=args.rounds, min_hospitals=5, learning_rate=defaults.learning_rate,
                       batch_size=defaults.batch_size, weight_decay=defaults.weight_decay)
    console = Console(width=120)
    with tempfile.TemporaryDirectory(prefix="health-mlops-bench-") as scratch:
        root = Path(scratch)
        data = root / "data"
        generate_dataset(data, n_hospitals=5, rows_per_hospital=4000, seed=7, split_seed=settings.split_seed,
                         test_fraction=settings.test_fraction, stratify=settings.stratified_split)
        hospitals = load_hospitals(data, spec)
        splits = split_hospitals(hospitals, spec, seed=settings.split_seed, test_fraction=settings.test_fraction,
                                 stratify=settings.stratified_split)
        rows: list[tuple[str, float, float, float]] = []

        started = time.perf_counter()
        _, run = run_federated_in_memory(spec, splits, config)
        # In memory the hospitals run one after another: a round's compute is their sum.
        computes = [sum(m.compute_seconds for m in r.hospitals.values()) for r in run.history
                    if r.kind.value == "fit"]
        rows.append(("in-memory, hospitals in turn", time.perf_counter() - started,
                     1000 * statistics.median(computes), 0.0))

        for name, plain_http in (("loopback mutual TLS, 1 process", False), ("loopback plain HTTP, 1 process", True)):
            loopback = run_federation_over_loopback(spec, hospitals, config, split_seed=settings.split_seed,
                                                    test_fraction=settings.test_fraction,
                                                    stratify=settings.stratified_split, plain_http=plain_http)
            fits = [r for r in loopback.run.history if r.kind.value == "fit"]
            rows.append((name, loopback.timing.wall_seconds,
                         1000 * statistics.median(r.closed_at - r.opened_at for r in fits),
                         loopback.timing.round_overhead_ms_median))

        home = root / "home"
        os.environ["HEALTH_MLOPS_HOME"] = str(home)
        provision(home / "credentials", hospital_ids(5))
        base = free_ports(14)
        with Processes(home / "logs", {**os.environ}) as processes:
            view, _ = run_federation(processes, data=data, hospitals=hospital_ids(5), cities={},
                                     request=RunRequest(config=config), home=home,
                                     credentials_dir=home / "credentials",
                                     ports=Ports(base, base + 13, base + 1, base + 7), metric="auc",
                                     console=Console(file=io.StringIO()))
        fits = [r for r in view.history if r.kind.value == "fit"]
        # From the run's start to its end, as the aggregator saw it; starting 7 Python processes is not counted.
        rows.append(("processes: aggregator + 6 nodes, mutual TLS",
                     view.history[-1].closed_at - view.history[0].opened_at,
                     1000 * statistics.median(r.closed_at - r.opened_at for r in fits),
                     statistics.median(round_overheads_ms(view))))

    table = Table(title=f"{args.rounds} FedAvg rounds, 5 hospitals x 4000 rows, {os.cpu_count()} CPUs")
    for column in ("how", "run s", "round ms (median)", "overhead ms (median)", "run / in-memory"):
        table.add_column(column, justify="left" if column == "how" else "right")
    for name, wall, round_ms, overhead in rows:
        table.add_row(name, f"{wall:.2f}", f"{round_ms:.1f}", f"{overhead:.1f}", f"{wall / rows[0][1]:.2f}x")
    console.print(table)
    tls, plain = rows[1][3], rows[2][3]
    console.print(f"round overhead, mutual TLS / plain HTTP (loopback, 1 process): {tls:.1f} / {plain:.1f} ms = "
                  f"{tls / plain:.2f}x")


if __name__ == "__main__":
    main()
