"""Aggregation alone: what closing a round costs each strategy, in time and memory, against a plain numpy sum.

For N hospitals x P float32 parameters (default: N in 5, 50, 200 x P in 100k, 1M, 10M) and the strategies fedavg,
fedyogi, median and trimmed_mean (their default settings: trimmed_mean cuts 20 % from each end), each measurement
goes through the code path the aggregator's coordinator uses: a `RoundAggregation(config, current)` is fed the N
updates one by one (`add`, as `Coordinator._accept` does for each accepted result), then `finish(state)` (as
`_close_round` does). The time is that of construction + the N `add` + `finish`: the whole aggregation cost of a
round. The model is one float32 tensor of P elements (the strategies work tensor by tensor, so one tensor is the
worst case for their temporaries); `current`, the global model before the round, is float32 as the coordinator
keeps it. Updates are the global model plus a small per-hospital delta (seeded: base ~ 0.1 N(0,1), delta ~
0.01 N(0,1)); example counts are seeded integers in [100, 5000].

Inputs. Each hospital's update is a `.npy` file in a temporary folder under /tmp (`np.lib.format.open_memmap`),
passed as a read-only array mapped as the aggregator maps a result file (`health_mlops.fl.mapped.map_file`: the
strategies read it a block at a time and let each block's pages go once read), and 200 x 10M float32 is 8 GB.
The bound and every strategy read the same files: the files are read once before any timing (page cache warm),
and every timed run maps them afresh (so each pays the same page-mapping faults; the bound lets nothing go). The
folder is removed at the end.

The bound: the plain in-place numpy sum of the same bytes, `total += update` over the N float32 updates into a
preallocated float32 `total`, timed in the same run on the same files. A strategy's ratio is its time / the bound.
Timings are the median of `--repeats` runs (default 3; bound and strategies interleaved) for inputs under
`--big-gb` (default 4 GB: every size but 200 x 10M), and one run above.

Memory: in a separate run (tracing slows Python), `tracemalloc` (numpy reports its allocations to it) gives the
peak of the bytes allocated from the start of the round (construction) to the end of `finish`, above what was
allocated before: the inputs (memory-mapped, not allocations) and the global model are excluded; everything the
round allocates is included, its float32 outputs too. "kept" is what is still allocated after `finish` (the new
global weights, and for fedyogi the new optimiser state). fedyogi is measured on a first round, from an empty
`ServerOptimiserState()`: its two float32 moments are created during the round and counted. Ratios are to one
update's bytes (4P).

Accumulator error (N=200, a sample of coordinates): FedAvg's cascade of float32 partial sums (our
`RoundAggregation`), a float64 running sum, a plain float32 running sum and a compensated (Kahan) float32 one,
against the exact weighted mean (`math.fsum` of the exact float64 products, divided once), in float32 ulps of the
exact value.

Run with `make bench` (or `python benchmarks/aggregation.py [--hospitals N ...] [--params P ...]
[--strategies ...] [--repeats R]`): prints a table and writes benchmarks/results/aggregation.md (7 min on 2
CPUs, 8 GB of temporary files at 200 x 10M). `--hospitals N --params P --json` runs one size and prints only a
JSON list of {"strategy", "hospitals", "params", "seconds", "bound_seconds", "peak_extra_bytes", "update_bytes"}
on stdout.

Threads: FedAvg's fold is a BLAS call (saxpy), and OpenBLAS would spread it over every CPU where numpy's sum uses
one; the benchmark pins BLAS to one thread (OPENBLAS_NUM_THREADS=1, unless set) so that both sides use one CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy and scipy load OpenBLAS

import argparse
import gc
import json
import math
import signal
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from health_mlops.fl.mapped import map_file
from health_mlops.fl.run_config import StrategyConfig
from health_mlops.fl.strategies import ClientUpdate, RoundAggregation, ServerOptimiserState

HOSPITALS = (5, 50, 200)
PARAMS = (100_000, 1_000_000, 10_000_000)
STRATEGIES = ("fedavg", "fedyogi", "median", "trimmed_mean")
TENSOR = "weight"  # the model's one tensor
SEED = 20
WRITE_CHUNK = 1 << 22  # elements generated and written at a time
# Acceptance (issue 14), at 50 x 10M
ACCEPT_SIZE = (50, 10_000_000)
ACCEPT_TIME = {"fedavg": 1.5, "median": 10.0, "trimmed_mean": 10.0}
ACCEPT_MEMORY = 3.0
ERROR_HOSPITALS, ERROR_COORDINATES = 200, 100_000
RESULT = Path(__file__).parent / "results" / "aggregation.md"


@dataclass(frozen=True)
class Measurement:
    strategy: str
    hospitals: int
    params: int
    seconds: float  # construction + N add + finish
    bound_seconds: float  # the plain float32 in-place sum, same files, same run
    peak_extra_bytes: int
    update_bytes: int
    finish_seconds: float = 0.0  # of `seconds`, closing the round
    kept_bytes: int = 0  # still allocated after finish: new weights (+ optimiser state)
    repeats: int = 1

    def public(self) -> dict[str, object]:
        keys = ("strategy", "hospitals", "params", "seconds", "bound_seconds", "peak_extra_bytes", "update_bytes")
        return {k: v for k, v in asdict(self).items() if k in keys}


# --- inputs -------------------------------------------------------------------------------------------------


def write_updates(folder: Path, hospitals: int, params: int, seed: int) -> tuple[list[Path], list[int], np.ndarray]:
    """N update files (float32 .npy), their example counts, and the global model before the round (float32)."""
    base = (0.1 * np.random.default_rng([seed, params]).standard_normal(params, dtype=np.float32)).astype(np.float32)
    paths = []
    for hospital in range(hospitals):
        rng = np.random.default_rng([seed, params, hospital])
        path = folder / f"update-{hospital:04d}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(params,))
        for start in range(0, params, WRITE_CHUNK):
            stop = min(start + WRITE_CHUNK, params)
            delta = rng.standard_normal(stop - start, dtype=np.float32)
            delta *= np.float32(0.01)
            np.add(base[start:stop], delta, out=array[start:stop])
        array.flush()
        del array
        paths.append(path)
    examples = [int(n) for n in np.random.default_rng([seed, hospitals]).integers(100, 5001, size=hospitals)]
    return paths, examples, base


def open_updates(paths: Sequence[Path]) -> list[np.ndarray]:
    """The updates as read-only memory maps, mapped afresh as the aggregator maps a result (`map_file`: read a
    block at a time, each block let go once read)."""
    return [map_file(path, np.load(path, mmap_mode="r").offset).view(np.float32) for path in paths]


# --- one run ------------------------------------------------------------------------------------------------


def plain_sum(paths: Sequence[Path], params: int) -> float:
    """Seconds of `total += update` over the files into a preallocated float32 total."""
    updates = open_updates(paths)
    total = np.zeros(params, dtype=np.float32)
    gc.collect()
    started = time.perf_counter()
    for update in updates:
        total += update
    return time.perf_counter() - started


def aggregate_round(strategy: str, updates: Sequence[np.ndarray], examples: Sequence[int],
                    current: np.ndarray) -> tuple[float, float, tuple]:
    """(seconds, of which finish, result) of one round through `RoundAggregation`, as the coordinator runs it."""
    started = time.perf_counter()
    aggregation = RoundAggregation(StrategyConfig(name=strategy), {TENSOR: current})
    for update, n in zip(updates, examples):
        aggregation.add(ClientUpdate({TENSOR: update}, n))
    closing = time.perf_counter()
    result = aggregation.finish(ServerOptimiserState())
    ended = time.perf_counter()
    return ended - started, ended - closing, result


def timed_round(strategy: str, paths: Sequence[Path], examples: Sequence[int],
                current: np.ndarray) -> tuple[float, float]:
    updates = open_updates(paths)
    gc.collect()
    seconds, finish, result = aggregate_round(strategy, updates, examples, current)
    del result
    return seconds, finish


def memory_round(strategy: str, paths: Sequence[Path], examples: Sequence[int], current: np.ndarray) -> tuple[int, int]:
    """(peak, kept) bytes allocated by one round above what was allocated before it (inputs are memory-mapped)."""
    tracemalloc.start()
    try:
        updates = open_updates(paths)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        _, _, result = aggregate_round(strategy, updates, examples, current)
        kept, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak - before, kept - before


def bound_memory(paths: Sequence[Path], params: int) -> int:
    tracemalloc.start()
    try:
        updates = open_updates(paths)
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        total = np.zeros(params, dtype=np.float32)
        for update in updates:
            total += update
        peak = tracemalloc.get_traced_memory()[1]
        del total
    finally:
        tracemalloc.stop()
    return peak - before


# --- one size -----------------------------------------------------------------------------------------------


def measure_size(hospitals: int, params: int, strategies: Sequence[str], *, repeats: int, seed: int, tmp: Path,
                 progress: Progress | None = None, bar=None) -> tuple[list[Measurement], int]:
    """Every strategy's measurement at one size, and the bound's peak bytes."""

    def step(what: str) -> None:
        if progress is not None:
            progress.update(bar, description=f"{hospitals} x {params:,}: {what}")

    with tempfile.TemporaryDirectory(prefix="health-mlops-aggregation-", dir=tmp) as scratch:
        step("writing updates")
        paths, examples, current = write_updates(Path(scratch), hospitals, params, seed)
        step("warming the page cache")
        plain_sum(paths, params)  # reads every file once: all timed runs find them in the page cache
        bounds: list[float] = []
        times: dict[str, list[tuple[float, float]]] = {s: [] for s in strategies}
        for repeat in range(repeats):
            step(f"bound (run {repeat + 1}/{repeats})")
            bounds.append(plain_sum(paths, params))
            for strategy in strategies:
                step(f"{strategy} (run {repeat + 1}/{repeats})")
                times[strategy].append(timed_round(strategy, paths, examples, current))
        step("bound memory")
        bound_peak = bound_memory(paths, params)
        results = []
        for strategy in strategies:
            step(f"{strategy} memory")
            peak, kept = memory_round(strategy, paths, examples, current)
            results.append(Measurement(strategy, hospitals, params, statistics.median(t for t, _ in times[strategy]),
                                       statistics.median(bounds), peak, 4 * params,
                                       statistics.median(f for _, f in times[strategy]), kept, repeats))
            if progress is not None:
                progress.advance(bar)
    return results, bound_peak


# --- accumulator error --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Error:
    method: str
    max_ulps: float  # in float32 ulps of the exact mean
    median_ulps: float
    max_relative: float
    max_of_magnitude: float  # error / the weighted mean of the values' magnitudes (what rounding scales with)
    differs: float  # share of coordinates whose result, rounded to float32, is not the exact mean rounded to float32


def accumulator_errors(hospitals: int = 200, coordinates: int = 100_000, seed: int = SEED) -> list[Error]:
    """FedAvg's weighted mean of `hospitals` updates on `coordinates` weights: our cascade of float32 partial sums, a
    float64 running sum, a plain and a compensated float32 running sum, each against the exact mean."""
    base = (0.1 * np.random.default_rng([seed, 0]).standard_normal(coordinates)).astype(np.float32)
    updates = [(base + 0.01 * np.random.default_rng([seed, 1, h]).standard_normal(coordinates, dtype=np.float32))
               .astype(np.float32) for h in range(hospitals)]
    examples = [int(n) for n in np.random.default_rng([seed, 2]).integers(100, 5001, size=hospitals)]
    total_examples = sum(examples)
    # float32 x an integer below 2**13 is exact in float64 (24 + 13 bits); fsum rounds their sum once.
    products = np.stack([u.astype(np.float64) * n for u, n in zip(updates, examples)]).T.copy()
    exact = np.array([math.fsum(row) for row in products]) / total_examples
    magnitude = np.abs(products).sum(axis=1) / total_examples

    ours = RoundAggregation(StrategyConfig(name="fedavg"), {TENSOR: base})
    for update, n in zip(updates, examples):
        ours.add(ClientUpdate({TENSOR: update}, n))
    cascade = ours.finish(ServerOptimiserState())[0][TENSOR]

    float64_sum = np.zeros(coordinates, dtype=np.float64)
    for update, n in zip(updates, examples):
        float64_sum += update.astype(np.float64) * n
    float64_sum /= total_examples
    plain = np.zeros(coordinates, dtype=np.float32)
    kahan, compensation = np.zeros(coordinates, dtype=np.float32), np.zeros(coordinates, dtype=np.float32)
    for update, n in zip(updates, examples):
        weighted = update * np.float32(n)
        plain += weighted
        y = weighted - compensation
        t = kahan + y
        compensation = (t - kahan) - y
        kahan = t
    plain /= np.float32(total_examples)
    kahan /= np.float32(total_examples)

    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    exact32 = exact.astype(np.float32)
    errors = []
    for method, value in (("float32 partial sums of 16, cascaded (ours)", cascade),
                          ("float64 running sum", float64_sum), ("float32 running sum", plain),
                          ("Kahan float32 running sum", kahan)):
        error = np.abs(value.astype(np.float64) - exact)
        errors.append(Error(method, float(np.max(error / ulp)), float(np.median(error / ulp)),
                            float(np.max(error / np.abs(exact))), float(np.max(error / magnitude)),
                            float(np.mean(value.astype(np.float32) != exact32))))
    return errors


# --- report -------------------------------------------------------------------------------------------------


def size_label(params: int) -> str:
    return f"{params // 1_000_000}M" if params >= 1_000_000 else f"{params // 1000}k"


def mb(value: int) -> str:
    return f"{value / 2**20:,.1f}"


HEADERS = ("N", "P", "strategy", "seconds", "of which finish", "bound s", "time / bound", "peak extra MB",
           "peak / update", "kept / update", "runs")


def cells(m: Measurement) -> list[str]:
    return [str(m.hospitals), size_label(m.params), m.strategy, f"{m.seconds:.4f}", f"{m.finish_seconds:.4f}",
            f"{m.bound_seconds:.4f}", f"{m.seconds / m.bound_seconds:.2f}x", mb(m.peak_extra_bytes),
            f"{m.peak_extra_bytes / m.update_bytes:.2f}x", f"{m.kept_bytes / m.update_bytes:.2f}x", str(m.repeats)]


def verdicts(measurements: Sequence[Measurement]) -> list[str]:
    lines = []
    at = [m for m in measurements if (m.hospitals, m.params) == ACCEPT_SIZE]
    n, p = ACCEPT_SIZE
    for m in at:
        if m.strategy in ACCEPT_TIME:
            ratio = m.seconds / m.bound_seconds
            ok = "yes" if ratio <= ACCEPT_TIME[m.strategy] else "**no**"
            lines.append(f"{m.strategy} over {n} x {size_label(p)}: {ratio:.2f}x the plain sum "
                         f"(acceptance ≤ {ACCEPT_TIME[m.strategy]:g}x): {ok}")
    for m in at:
        ratio = m.peak_extra_bytes / m.update_bytes
        ok = "yes" if ratio <= ACCEPT_MEMORY else "**no**"
        lines.append(f"{m.strategy} peak extra memory over {n} x {size_label(p)}: {ratio:.2f}x one update "
                     f"(acceptance ≤ {ACCEPT_MEMORY:g}x): {ok}")
    over = [m for m in measurements if m.peak_extra_bytes > ACCEPT_MEMORY * m.update_bytes]
    if measurements:
        lines.append(f"peak extra memory above {ACCEPT_MEMORY:g}x one update, any size: "
                     + (", ".join(f"{m.strategy} {m.hospitals} x {size_label(m.params)} "
                                  f"({m.peak_extra_bytes / m.update_bytes:.1f}x)" for m in over) or "none"))
    return lines


def error_lines(errors: Sequence[Error], hospitals: int, coordinates: int) -> list[str]:
    header = (f"Accumulator error, FedAvg over {hospitals} hospitals, {coordinates:,} coordinates, against the exact "
              f"weighted mean (math.fsum of exact float64 products, divided once); ulp: float32 ulp of the exact mean")
    rows = ["| accumulator | max error (ulp) | median error (ulp) | max relative error | max error / mean magnitude "
            "| float32 result ≠ exact rounded to float32 |", "|---|---:|---:|---:|---:|---:|"]
    rows += [f"| {e.method} | {e.max_ulps:.3g} | {e.median_ulps:.3g} | {e.max_relative:.2e} | "
             f"{e.max_of_magnitude:.2e} | {100 * e.differs:.2f} % |" for e in errors]
    return [header, "", *rows]


def markdown(measurements: Sequence[Measurement], bound_peaks: dict[tuple[int, int], int], errors: Sequence[Error],
             command: str, minutes: float) -> str:
    lines = ["# Aggregation benchmark", "",
             f"`{command}` (`make bench`), {os.cpu_count()} CPUs, numpy {np.__version__}, {minutes:.1f} min. "
             "Each strategy through the coordinator's code path (`RoundAggregation`: N `add`, then `finish`), the "
             "model one float32 tensor of P elements, updates memory-mapped `.npy` files (page cache warm). "
             "bound: the plain in-place float32 sum `total += update` of the same files in the same run. "
             "seconds: median of `runs` runs. peak extra: tracemalloc peak above the inputs and the global model "
             "(float32 output and, for fedyogi, its first round's two moments included); kept: still allocated "
             "after finish. update: 4P bytes. Method and definitions: the docstring of benchmarks/aggregation.py.",
             "",
             "| " + " | ".join(HEADERS) + " |",
             "|---:|---:|---|" + "---:|" * (len(HEADERS) - 3)]
    lines += ["| " + " | ".join(cells(m)) + " |" for m in measurements]
    lines += ["", "The bound's own peak (its preallocated float32 total): "
              + ", ".join(f"{n} x {size_label(p)} {peak / (4 * p):.2f}x" for (n, p), peak in bound_peaks.items()), ""]
    lines += [f"- {line}" for line in verdicts(measurements)]
    if errors:
        lines += ["", *error_lines(errors, ERROR_HOSPITALS, ERROR_COORDINATES)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, nargs="+", default=list(HOSPITALS))
    parser.add_argument("--params", type=int, nargs="+", default=list(PARAMS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per size below --big-gb (median)")
    parser.add_argument("--big-gb", type=float, default=4.0, help="inputs from this size on are timed once")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="where the update files are written")
    parser.add_argument("--json", action="store_true", help="print only a JSON list of measurements on stdout")
    parser.add_argument("--no-error", action="store_true", help="skip the accumulator error measurement")
    parser.add_argument("--out", type=Path, default=RESULT, help="markdown result (not written with --json)")
    args = parser.parse_args()
    # Killed (SIGTERM): unwind, so that the temporary update files (up to 8 GB) are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console(width=160, stderr=args.json)
    sizes = [(n, p) for n in args.hospitals for p in args.params]
    measurements: list[Measurement] = []
    bound_peaks: dict[tuple[int, int], int] = {}
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.json) as progress:
        bar = progress.add_task("aggregation", total=len(sizes) * len(args.strategies))
        for n, p in sizes:
            repeats = args.repeats if 4 * n * p < args.big_gb * 1e9 else 1
            found, bound_peaks[n, p] = measure_size(n, p, args.strategies, repeats=repeats, seed=args.seed,
                                                    tmp=args.tmp, progress=progress, bar=bar)
            measurements += found
        errors: list[Error] = []
        if not args.json and not args.no_error:
            progress.update(bar, description="accumulator error")
            errors = accumulator_errors(ERROR_HOSPITALS, ERROR_COORDINATES, args.seed)
    minutes = (time.perf_counter() - started) / 60
    if args.json:
        json.dump([m.public() for m in measurements], sys.stdout)
        sys.stdout.write("\n")
        return

    table = Table(title=f"Aggregation through RoundAggregation vs the plain float32 sum, {os.cpu_count()} CPUs")
    for name in HEADERS:
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for i, m in enumerate(measurements):
        last = i + 1 == len(measurements) or (measurements[i + 1].hospitals, measurements[i + 1].params) != (
            m.hospitals, m.params)
        table.add_row(*cells(m), end_section=last)
    console.print(table)
    for line in verdicts(measurements):
        console.print(line.replace("**", ""))
    if errors:
        error_table = Table(title=f"FedAvg accumulator error, {ERROR_HOSPITALS} hospitals, "
                                  f"{ERROR_COORDINATES:,} coordinates, "
                                  "vs exact (float32 ulps of the exact mean)")
        for name in ("accumulator", "max ulp", "median ulp", "max relative", "max / magnitude",
                     "≠ exact in float32"):
            error_table.add_column(name, justify="left" if name == "accumulator" else "right")
        for e in errors:
            error_table.add_row(e.method, f"{e.max_ulps:.3g}", f"{e.median_ulps:.3g}", f"{e.max_relative:.2e}",
                                f"{e.max_of_magnitude:.2e}", f"{100 * e.differs:.2f} %")
        console.print(error_table)
    console.print(f"{len(sizes)} sizes in {minutes:.1f} min")
    command = "python benchmarks/aggregation.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(measurements, bound_peaks, errors, command, minutes))
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
