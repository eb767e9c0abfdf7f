"""What secure aggregation's cryptography costs a round, side by side with plain FedAvg's sum, in one run.

For N hospitals x P float32 parameters (default N in 5, 20 x P in 100k, 1M), one round of the protocol core
(`health_mlops.fl.secagg`, no network):
  hospital     one hospital's work, the median over the N: new keys, a signed advertisement, checking the N
               advertisements, its shares out (Shamir, AES-GCM) and the N - 1 shares in, quantizing n·w and masking
               it (its self mask and N - 1 pairwise masks, ChaCha20), its reveal (a run tolerating colluders adds
               signing the survivors, 0.06 ms, and checking 20 hospitals' signatures, 3 ms)
  aggregator   summing the N masked inputs and removing the masks (the survivors' self masks rebuilt from t
               shares each); "1 dropped" also removes the pairwise masks one hospital left behind
  plain        FedAvg's sum without protection: Σ n·w over the N updates in float64, as the masked sum is taken
The hospitals work in parallel, so a round's added time is about one hospital's work plus the aggregator's; the
ratio is (hospital + aggregator) / plain. Medians of `--repeats` runs (default 3).

Run with `make bench` (or `python benchmarks/secure_aggregation.py [--hospitals N ...] [--params P ...]`); writes
benchmarks/results/secure_aggregation.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from rich.console import Console
from rich.table import Table

from health_mlops.fl.secagg import (RoundContext, RoundKeys, ShareHolder, default_threshold, mask, quantize, unmask,
                                    verify_advertisements)
from health_mlops.trust.pki import CA, cert_path, ensure_certificates, key_path

RESULTS = Path(__file__).parent / "results" / "secure_aggregation.md"


def consortium(folder: Path, hospitals: list[str]) -> tuple[x509.Certificate, dict, dict]:
    ensure_certificates(folder, hospitals)
    certificates = {h: x509.load_pem_x509_certificate(cert_path(folder, h).read_bytes()) for h in hospitals}
    keys = {}
    for hospital in hospitals:
        key = serialization.load_pem_private_key(key_path(folder, hospital).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        keys[hospital] = key
    return x509.load_pem_x509_certificate(cert_path(folder, CA).read_bytes()), certificates, keys


def one_round(folder: Path, n_hospitals: int, params: int, seed: int) -> dict[str, float]:
    hospitals = [f"hospital-{i:02d}" for i in range(1, n_hospitals + 1)]
    ca, certificates, signing = consortium(folder, hospitals)
    context = RoundContext("bench", 1, 0, tuple(hospitals), default_threshold(n_hospitals))
    rng = np.random.default_rng(seed)
    counts = {h: int(rng.integers(100, 5000)) for h in hospitals}
    weights = {h: rng.normal(0, 0.1, params).astype(np.float32) for h in hospitals}

    started = time.perf_counter()
    total = np.zeros(params, dtype=np.float64)
    for hospital in hospitals:
        total += counts[hospital] * weights[hospital].astype(np.float64)
    plain = time.perf_counter() - started

    # Each hospital's steps, timed per hospital (they run in parallel in a real round).
    spent = dict.fromkeys(hospitals, 0.0)

    def timed(hospital: str, step, *args):  # noqa: ANN001, ANN202 - a benchmark's stopwatch
        began = time.perf_counter()
        result = step(*args)
        spent[hospital] += time.perf_counter() - began
        return result

    keys = {h: timed(h, RoundKeys, h) for h in hospitals}
    advertised = [timed(h, keys[h].advertise, context, signing[h]) for h in hospitals]
    checked = {h: timed(h, verify_advertisements, context, advertised, certificates, ca) for h in hospitals}
    holders = {h: timed(h, ShareHolder, context, keys[h], checked[h]) for h in hospitals}
    for sender in hospitals:
        for shares in timed(sender, holders[sender].outgoing):
            timed(shares.recipient, holders[shares.recipient].receive, shares)
    masked = {h: timed(h, lambda h=h: mask(context, keys[h], checked[h],
                                           quantize(counts[h] * weights[h].astype(np.float64),
                                                    headroom=n_hospitals)))
              for h in hospitals}
    reveals = [timed(h, holders[h].reveal, hospitals) for h in hospitals]
    started = time.perf_counter()
    unmask(context, masked, reveals, checked[hospitals[0]])
    aggregator = time.perf_counter() - started

    survivors = hospitals[1:]  # hospital-01 dropped before sending its masked input
    fresh = {h: ShareHolder(context, keys[h], checked[h]) for h in hospitals}
    for sender in hospitals:
        for shares in fresh[sender].outgoing():
            fresh[shares.recipient].receive(shares)
    started = time.perf_counter()
    unmask(context, {h: masked[h] for h in survivors}, [fresh[h].reveal(survivors) for h in survivors],
           checked[hospitals[0]])
    dropped = time.perf_counter() - started
    return {"plain": plain, "hospital": statistics.median(spent.values()), "aggregator": aggregator,
            "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(title="secure aggregation's cryptography per round vs plain FedAvg's sum (medians, ms)")
    for column in ("hospitals", "parameters", "plain sum", "one hospital", "aggregator", "aggregator, 1 dropped",
                   "ratio (hospital + aggregator) / plain"):
        table.add_column(column, justify="right")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n_hospitals in args.hospitals:
            for params in args.params:
                runs = [one_round(Path(scratch) / f"{n_hospitals}-{params}-{r}", n_hospitals, params, r)
                        for r in range(args.repeats)]
                median = {k: 1000 * statistics.median(run[k] for run in runs) for k in runs[0]}
                ratio = (median["hospital"] + median["aggregator"]) / median["plain"]
                row = [str(n_hospitals), f"{params:,}", f"{median['plain']:.1f}", f"{median['hospital']:.1f}",
                       f"{median['aggregator']:.1f}", f"{median['dropped']:.1f}", f"{ratio:.1f}×"]
                table.add_row(*row)
                rows.append(row)
    console = Console()
    console.print(table)
    header = ["hospitals", "parameters", "plain sum ms", "one hospital ms", "aggregator ms", "aggregator, 1 dropped ms",
              "(hospital + aggregator) / plain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]
    RESULTS.write_text("# Secure aggregation: the protocol core's cost per round\n\n"
                       "`python benchmarks/secure_aggregation.py` (medians of 3)\n\n" + "\n".join(lines) + "\n",
                       encoding="utf-8")
    console.print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
