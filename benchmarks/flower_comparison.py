"""health-mlops against Flower 1.42's deployment engine: the same 5-hospital task, side by side in one run.

The task is benchmarks/federation_overhead.py's (the acceptance data: 5 hospitals x 4000 patient-days of the
synthetic generator, seed 7; FedAvg; the project's training defaults; 1 local epoch): round 0 statistics, R fit
rounds, a final evaluation. Run two ways, one after the other:
  health-mlops  federation_overhead.py's "processes" row, with one node process per hospital: the aggregator and
                5 `health-mlops node` processes on loopback, mutual TLS (`demo.run_federation`)
  Flower        `flower-superlink --insecure` and 5 `flower-supernode --insecure` on loopback, each given its
                hospital's partition with --node-config, and benchmarks/flower_app started with `flwr run`: a
                ServerApp running Flower's own FedAvg and a ClientApp whose every message is handled by
                health-mlops' `HospitalWorker` (the same model, split, preprocessing, local training, seeds)
A fit round's overhead is its wall time minus its slowest hospital's compute (the hospitals work in parallel);
compute is `HospitalWorker`'s `compute_seconds` on both sides (score the incoming model on the test rows, train).
"run s" runs from round 0's opening to the final evaluation's closing, as each coordinator saw it; starting the
processes is not counted.

10 rounds by default, not federation_overhead.py's 20: a Flower round takes 10 to 30 s on 2 shared CPUs, and the
medians need no more to keep the whole run near 5 minutes.

Flower lives in .venv-flower (`make flower`); nothing is downloaded at run time. `make bench` runs this, or
`.venv/bin/python benchmarks/flower_comparison.py [--rounds R]`; it writes benchmarks/results/flower_comparison.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from common import free_ports

from health_mlops.config import get_settings, get_training_defaults
from health_mlops.data.hospital import load_hospitals
from health_mlops.data.split import HospitalSplit, split_hospitals
from health_mlops.data.synthetic import generate_dataset, hospital_ids
from health_mlops.demo.federation import NodePlan, Ports, run_federation
from health_mlops.demo.processes import Processes
from health_mlops.experiments.loopback import round_overheads_ms
from health_mlops.fl.messages import RunRequest, weighted_metrics
from health_mlops.fl.run_config import RunConfig
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import provision

REPO = Path(__file__).resolve().parent.parent
APP = Path(__file__).resolve().parent / "flower_app"
RESULTS = Path(__file__).resolve().parent / "results" / "flower_comparison.md"
SPEC = "health-risk"
HOSPITALS = 5


@dataclass
class Measured:
    how: str
    wall_s: float  # round 0's opening to the final evaluation's closing
    round_ms: list[float]  # per fit round
    compute_ms: list[float]  # per fit round: its slowest hospital's compute
    overhead_ms: list[float]  # per fit round: round_ms - compute_ms
    metric: float  # the final model's example-weighted test metric over the hospitals
    startup_s: list[float] = field(default_factory=list)  # Flower, per fit round: the slowest ClientApp's start
    extra: dict[str, float] = field(default_factory=dict)


DIFFERENCES = """## What differs between the two setups

- **The same**: the data (the acceptance data, the split a health-mlops node makes: the driver writes each
  hospital's train and test rows to parquet for its SuperNode and checks they read back identical), the model,
  the initial weights (seed 0), round 0's statistics (same function, reduced by `reduce_stats`), the local work of
  every round (`HospitalWorker.handle`: score the incoming model on the test rows, 1 epoch of Adam, the project's
  learning rate, batch size and weight decay, seeded by the round), FedAvg weighted by examples, 5 hospitals,
  every hospital in every round, loopback, 1 torch thread per process, the same 2 CPUs. Both final models score
  the same (the last column).
- **Security**: health-mlops runs as deployed (mutual TLS, a bearer token per hospital, every update validated,
  every accepted result and round written to disk with fsync); Flower runs `--insecure` (plain HTTP, no SuperNode
  authentication, its state in memory), as the issue asks. health-mlops does more per round, not less.
- **How work reaches a hospital**: a health-mlops node is one long-lived process holding a long poll open, so a
  task starts as soon as the round opens. Flower, with its defaults (untuned): a SuperNode polls the SuperLink for
  messages every 3 s when idle, its SuperExec polls for tasks every 1 s and starts a new `flwr-clientapp` process
  for every message (the interpreter, flwr, torch, pandas and scikit-learn imported, the app bundle installed, the
  partition loaded again), and the ServerApp polls for replies every 3 s (`send_and_receive`).
- **Compute is counted in Flower's favour**: because every Flower message runs in a fresh process, its compute
  includes torch's first-call warm-up in every round (alone on this machine: 1.3 s for the first fit of a
  process, 35 ms for the next), and 5 ClientApps start, import and train at once on 2 CPUs. All of that counts
  as compute, not overhead, so Flower's overhead here is understated; health-mlops pays the warm-up once, in
  round 1.
- **2 CPUs for everything**: on one machine per hospital Flower's ClientApps would start faster (importing the
  app's modules alone takes about 3 s in one process here) and its overhead would be smaller, but its polls alone
  can add up to 3 + 1 + 3 s a round.
- **Aggregation precision**: health-mlops sums updates in float32 partial sums of at most 16 terms, cascaded
  (`WeightedMean`), Flower's FedAvg in one float32 running sum.
- **Not counted on either side**: starting the processes; health-mlops' ONNX export and MLflow registration after
  the run. Flower's `flwr run` end to end (bundle built and uploaded, ServerApp process started, log stream
  ended) is given below the table.
- **Layout**: one health-mlops node per hospital (federation_overhead.py's processes row runs hospital-1 twice).
"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def one_node_per_hospital(data: Path, hospitals: list[str], cities: dict[str, str]) -> list[NodePlan]:
    """`demo.node_plan` without the demo's second replica of hospital-1: 5 node processes, as 5 SuperNodes."""
    return [NodePlan(h, f"{h}-a", cities.get(h, ""), data / h) for h in hospitals]


def run_health_mlops(root: Path, data: Path, config: RunConfig, metric: str) -> Measured:
    home = root / "home"
    os.environ["HEALTH_MLOPS_HOME"] = str(home)
    provision(home / "credentials", hospital_ids(HOSPITALS))
    base = free_ports(14)
    with Processes(home / "logs", {**os.environ}) as processes:
        view, _ = run_federation(processes, data=data, hospitals=hospital_ids(HOSPITALS), cities={},
                                 request=RunRequest(config=config), home=home, credentials_dir=home / "credentials",
                                 ports=Ports(base, base + 13, base + 1, base + 7), metric=metric,
                                 console=Console(file=io.StringIO()),
                                 plan=one_node_per_hospital(data, hospital_ids(HOSPITALS), {}))
    fits = [r for r in view.history if r.kind.value == "fit"]
    return Measured("health-mlops: aggregator + 5 nodes, mutual TLS",
                    view.history[-1].closed_at - view.history[0].opened_at,
                    [1000 * (r.closed_at - r.opened_at) for r in fits],
                    [1000 * max(m.compute_seconds for m in r.hospitals.values()) for r in fits],
                    round_overheads_ms(view), view.history[-1].global_metrics[metric])


def write_partitions(splits: list[HospitalSplit], folder: Path, quarantined: dict[str, int]) -> dict[str, Path]:
    """Each hospital's train and test rows (the split health-mlops' node makes) for its SuperNode."""
    partitions = {}
    for split in splits:
        target = folder / split.hospital_id
        target.mkdir(parents=True)
        for name, frame in (("train", split.train), ("test", split.test)):
            frame.to_parquet(target / f"{name}.parquet", index=False)
            pd.testing.assert_frame_equal(pd.read_parquet(target / f"{name}.parquet"), frame)  # read back as is
        (target / "hospital.json").write_text(json.dumps({"hospital_id": split.hospital_id, "spec": SPEC,
                                                          "rows_quarantined": quarantined[split.hospital_id]}))
        partitions[split.hospital_id] = target
    return partitions


def wait_for(check: Callable[[], bool], what: str, processes: Processes, timeout_s: float = 120.0) -> None:
    """Until `check()`; a child that exits or the timeout ends the benchmark, naming where to look."""
    deadline = time.monotonic() + timeout_s
    while not check():
        for child in processes.children.values():
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited ({child.process.returncode}) waiting for {what}; the end of "
                                   f"{child.log_path}:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; logs in {processes.log_dir}")
        time.sleep(0.1)


def accepts(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def run_flower(root: Path, splits: list[HospitalSplit], quarantined: dict[str, int], config: RunConfig,
               venv: Path, metric: str) -> Measured:
    work = root / "flower"
    partitions = write_partitions(splits, work / "partitions", quarantined)
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(parents=True)
    base = free_ports(1 + HOSPITALS)  # the SuperLink's one HTTP port (Fleet, Control, Runtime), each SuperNode's
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{base}"\ninsecure = true\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update({"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv),
                "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
    timings_file = work / "timings.json"
    overrides = {"num-server-rounds": config.rounds, "local-epochs": config.local_epochs,
                 "learning-rate": config.learning_rate, "batch-size": config.batch_size,
                 "weight-decay": config.weight_decay, "seed": config.seed, "min-nodes": HOSPITALS,
                 "timings-file": str(timings_file)}
    run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    with Processes(work / "logs", env) as processes:
        processes.start_program("superlink", [str(venv / "bin" / "flower-superlink"), "--insecure", "--host",
                                              "127.0.0.1", "--port", str(base),
                                              "--disable-runtime-dependency-installation"])
        wait_for(lambda: accepts(base), "the SuperLink", processes)
        nodes = [processes.start_program(f"supernode-{h}", [
            str(venv / "bin" / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{base}",
            "--host", "127.0.0.1", "--port", str(base + 1 + i), "--node-config", f'partition-dir="{folder}"'])
            for i, (h, folder) in enumerate(partitions.items())]
        wait_for(lambda: all("SuperNode ID" in n.log_path.read_text(errors="replace") for n in nodes),
                 "the SuperNodes to register", processes)
        command = [str(venv / "bin" / "flwr"), "run", str(APP), "bench", "--stream", "--run-config", run_config]
        with open(work / "logs" / "flwr-run.log", "wb") as log:
            started = time.perf_counter()
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work,
                                  timeout=120 + 60 * config.rounds, check=False)
            end_to_end = time.perf_counter() - started
    if done.returncode != 0 or not timings_file.exists():
        raise RuntimeError(f"`flwr run` exited {done.returncode} without the ServerApp's timings; logs in "
                           f"{work / 'logs'}:\n{(work / 'logs' / 'flwr-run.log').read_text(errors='replace')[-3000:]}")
    timings = json.loads(timings_file.read_text())
    rounds = timings["rounds"]
    fits = [r for r in rounds if r["kind"] == "fit"]

    def slowest(r: dict, key: str) -> float:
        return max(h[key] for h in r["hospitals"].values())

    round_ms = [1000 * (r["closed"] - r["opened"]) for r in fits]
    compute_ms = [1000 * slowest(r, "compute_seconds") for r in fits]
    startup = [slowest(r, "startup_seconds") for r in fits]
    return Measured("Flower 1.42: SuperLink + 5 SuperNodes, insecure",
                    rounds[-1]["closed"] - rounds[0]["opened"], round_ms, compute_ms,
                    [t - c for t, c in zip(round_ms, compute_ms, strict=True)],
                    weighted_metrics(timings["evaluation"])[metric], startup,
                    {"flwr run s": end_to_end, "ClientApp start s": median(startup),
                     "partition load ms": median([1000 * slowest(r, "load_seconds") for r in fits])})


def version(venv: Path, package: str) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c",
                           f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() or "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--flower-venv", type=Path, default=REPO / ".venv-flower",
                        help="the venv `make flower` makes (flwr 1.42, torch, health-mlops --no-deps)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file written ('' for none)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (data, logs) and print its path")
    args = parser.parse_args()
    venv = args.flower_venv.resolve()
    if not (venv / "bin" / "flower-superlink").exists():
        sys.exit(f"no Flower in {venv}: run `make flower` first")
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    spec = load_spec(SPEC)
    defaults = get_training_defaults()
    config = RunConfig(rounds=args.rounds, min_hospitals=HOSPITALS, learning_rate=defaults.learning_rate,
                       batch_size=defaults.batch_size, weight_decay=defaults.weight_decay)
    console = Console(width=130)
    load_before = os.getloadavg()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="health-mlops-flower-bench-"))
    try:
        data = root / "data"
        generate_dataset(data, n_hospitals=HOSPITALS, rows_per_hospital=4000, seed=7, split_seed=settings.split_seed,
                         test_fraction=settings.test_fraction, stratify=settings.stratified_split)
        hospitals = load_hospitals(data, spec)
        splits = split_hospitals(hospitals, spec, seed=settings.split_seed, test_fraction=settings.test_fraction,
                                 stratify=settings.stratified_split)
        quarantined = {h: d.rows_quarantined for h, d in hospitals.items()}
        with console.status("health-mlops: aggregator + 5 node processes"):
            ours = run_health_mlops(root, data, config, spec.primary_metric)
        with console.status("Flower: SuperLink + 5 SuperNodes, flwr run"):
            flower = run_flower(root, splits, quarantined, config, venv, spec.primary_metric)
    finally:
        if args.keep:
            console.print(f"scratch folder (data, logs) kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    title = (f"{args.rounds} FedAvg rounds, {HOSPITALS} hospitals x 4000 rows, {os.cpu_count()} CPUs, "
             "medians over the fit rounds")
    columns = ("how", "run s", "round ms", "slowest compute ms", "overhead ms", "overhead / health-mlops",
               f"final {spec.primary_metric.upper()}")
    rows = [[m.how, f"{m.wall_s:.2f}", f"{median(m.round_ms):.1f}", f"{median(m.compute_ms):.1f}",
             f"{median(m.overhead_ms):.1f}", f"{median(m.overhead_ms) / median(ours.overhead_ms):.0f}x",
             f"{m.metric:.4f}"] for m in (ours, flower)]
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == "how" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    ratio = median(flower.overhead_ms) / median(ours.overhead_ms)
    verdict = (f"acceptance: health-mlops round overhead {median(ours.overhead_ms):.1f} ms "
               f"(<= 20 ms: {'yes' if median(ours.overhead_ms) <= 20 else 'NO'}); Flower's is {ratio:.0f}x that "
               f"(>= 500x: {'yes' if ratio >= 500 else 'NO'})")
    detail = (f"Flower, medians over fit rounds of the slowest hospital: ClientApp process started "
              f"{flower.extra['ClientApp start s']:.2f} s before its handler ran, partition load "
              f"{flower.extra['partition load ms']:.0f} ms; `flwr run` end to end {flower.extra['flwr run s']:.1f} s")
    console.print(verdict)
    console.print(detail)
    if str(args.results) not in ("", "."):
        write_results(args.results, args, venv, title, columns, rows, ours, flower, verdict, detail, total,
                      load_before, load_after, console)


def write_results(path: Path, args: argparse.Namespace, venv: Path, title: str, columns: tuple[str, ...],
                  rows: list[list[str]], ours: Measured, flower: Measured, verdict: str, detail: str, total: float,
                  load_before: tuple[float, ...], load_after: tuple[float, ...], console: Console) -> None:
    command = "python benchmarks/flower_comparison.py" + ("" if args.rounds == 10 else f" --rounds {args.rounds}")
    lines = [
        "# health-mlops against Flower's deployment engine",
        "",
        f"`{command}` (`make bench`; Flower from `make flower`), {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{total / 60:.1f} min in all. Machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other work "
        f"(1-minute load average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end, which includes "
        f"Flower's own ClientApp processes), Python {platform.python_version()}, "
        f"torch {torch.__version__} (both sides), flwr {version(venv, 'flwr')}. Method and definitions: the "
        "docstring of benchmarks/flower_comparison.py.",
        "",
        f"{title}:",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        verdict + ".",
        "",
        detail + ".",
        "",
        "Per fit round: round / slowest compute / overhead (ms), and for Flower the slowest ClientApp's process "
        "start before its handler ran (s):",
        "",
        "| round | health-mlops | Flower | Flower ClientApp start s |",
        "|---:|---:|---:|---:|",
        *(f"| {i + 1} | {a:.1f} / {b:.1f} / {c:.1f} | {d:.0f} / {e:.0f} / {f:.0f} | {g:.1f} |"
          for i, (a, b, c, d, e, f, g) in enumerate(zip(ours.round_ms, ours.compute_ms, ours.overhead_ms,
                                                        flower.round_ms, flower.compute_ms, flower.overhead_ms,
                                                        flower.startup_s, strict=True))),
        "",
        DIFFERENCES,
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
