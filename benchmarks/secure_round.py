"""Secure aggregation's cost per round through the real aggregator, side by side with plain FedAvg, in one run.

For N hospitals x P parameters (default N in 5, 20 x P in 100k, 1M), two runs each: FedAvg without and with
`secure_aggregation`, on the aggregator the CLI runs (`health-mlops aggregator --spec <file>`: its own process,
mutual TLS, checkpoints on disk), with the health-risk MLP widened to about P parameters
(benchmarks/round_at_scale.py's `sized_spec`). ONE process plays the N hospitals, a thread each with the node's own
client (`HospitalClient`, its certificate and token) and, in the secure run, the node's own `SecureFitSession`.
Each fit task: download the round's weights; wait `--delay` seconds (the hospital's training, the same for every
hospital; secure: meanwhile, as the node does, advertise keys, send and take shares and draw the masks in a thread);
send the weights plus seeded noise (secure: clipped, weighed, quantized and masked); (secure: sign the survivors,
then reveal its shares for them). The final evaluate task is
not answered and the run is cancelled.

A fit round's time is the aggregator's own (the run view's closed_at - opened_at: from its tasks to its closing,
the unmasking included); its overhead is that minus the delay. Medians over `--rounds` fit rounds (default 5).
The N hospitals' cryptography runs here in one process on this machine's CPUs, where real hospitals each run
their own in parallel: when the N hospitals' masks take these CPUs longer than the training (20 x 1M), the secure
overhead includes the rest of them. The training is a sleep: a real one competes with the masks for the hospital's
CPUs.

Run with `make bench` (or `python benchmarks/secure_round.py [--hospitals N ...] [--params P ...]`); prints the
table and writes benchmarks/results/secure_round.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from round_at_scale import Setup, global_weights, sized_spec, start_aggregator, stats_body, stop

from health_mlops.demo.processes import Processes
from health_mlops.fl.client import AdminClient, HospitalClient
from health_mlops.fl.messages import RunRequest, decode_weights, encode_result
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.secure_fit import ConsortiumIdentity, SecureFitSession
from health_mlops.fl.state import TaskKind, TaskResult
from health_mlops.trust.credentials import ADMIN, ClientCredential, provision

EXAMPLES = 1000
NOISE = 1e-4
RESULT = Path(__file__).parent / "results" / "secure_round.md"


def play(name: str, client: HospitalClient, identity: ConsortiumIdentity, noise: dict[str, np.ndarray], stats: bytes,
         delay_s: float, errors: list[BaseException]) -> None:
    """One hospital: answer tasks until the evaluate round (not answered)."""
    metadata = {"num_examples": EXAMPLES, "num_test_examples": EXAMPLES // 4, "metrics": {"auc": 0.7}}
    try:
        while True:
            task = client.next_task()
            if task is None:
                continue
            if task.kind is TaskKind.evaluate:
                return
            if task.kind is TaskKind.stats:
                body = stats
                session = None
            else:
                assert task.weights_path is not None
                current = decode_weights(client.weights(task.weights_path))[0]
                session = (SecureFitSession(client, identity, name, task) if task.config.secure_aggregation
                           else None)
                if session is not None:
                    session.start(current)
                time.sleep(delay_s)  # the hospital's training
                update = {n: current[n] + noise[n] for n in current}
                if session is not None:
                    update = session.masked(update, current, EXAMPLES, task.config.update_norm_bound)
                body = encode_result(TaskResult(dict(metadata), update), task.id)
            answer = client.submit_result(task.id, body)
            if answer.status_code != 200:
                raise RuntimeError(f"{name}: {task.id} refused ({answer.status_code}): {answer.text}")
            if session is not None:
                session.reveal()
    except BaseException as error:  # noqa: BLE001 - reported by the driver
        errors.append(error)


def one_run(setup: Setup, hospitals: int, params: int, *, secure: bool, rounds: int, delay_s: float,
            console: Console) -> list[float]:
    """The fit rounds' times (s, the aggregator's own) of one run."""
    label = f"{'secure' if secure else 'plain'} {hospitals} x {params:,}"
    home = setup.root / label.replace(" ", "-").replace(",", "")
    home.mkdir()
    spec_path, spec, exact = sized_spec(params, home)
    names = [f"hospital-{i}" for i in range(1, hospitals + 1)]
    rng = np.random.default_rng(hospitals)
    base = global_weights(spec)
    noise = {h: {n: (NOISE * rng.standard_normal(t.shape)).astype(np.float32) for n, t in base.items()} for h in names}
    aggregator, api, _ = start_aggregator(setup, home, spec_path, f"aggregator-{home.name}", None)
    errors: list[BaseException] = []
    clients = {h: HospitalClient(api, ClientCredential.from_directory(setup.credentials, h), node_id=f"{h}-sim",
                                 poll_wait_s=5.0) for h in names}
    threads = [threading.Thread(target=play, args=(h, clients[h], ConsortiumIdentity.of(
        ClientCredential.from_directory(setup.credentials, h)), noise[h], stats_body(spec), delay_s, errors))
        for h in names]
    try:
        for thread in threads:
            thread.start()
        with AdminClient(api, ClientCredential.from_directory(setup.credentials, ADMIN)) as admin:
            config = RunConfig(rounds=rounds, min_hospitals=hospitals, lease_s=600, round_deadline_s=3600,
                               secure_phase_s=600, update_norm_bound=1e9, secure_aggregation=secure)
            console.log(f"{label}: {exact:,} parameters, {rounds} fit rounds")
            run = admin.start_run(RunRequest(config=config, hospitals=names))
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            view = admin.run(run.id)
            admin.cancel(run.id)
    finally:
        for client in clients.values():
            client.close()
        stop(aggregator)
    fits = [r for r in view.history if r.kind is TaskKind.fit]
    if len(fits) != rounds or any(len(r.hospitals) != hospitals for r in fits):
        raise RuntimeError(f"{label}: not every fit round closed with every hospital")
    return [r.closed_at - r.opened_at for r in fits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay", type=float, default=1.0, help="each hospital's training time per round (s)")
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        credentials = root / "credentials"
        provision(credentials, [f"hospital-{i}" for i in range(1, max(args.hospitals) + 1)])
        with Processes(root / "logs", {**os.environ}) as processes:
            setup = Setup(root, credentials, processes, "")
            for hospitals in args.hospitals:
                for params in args.params:
                    plain, secure = (statistics.median(one_run(setup, hospitals, params, secure=s, rounds=args.rounds,
                                                               delay_s=args.delay, console=console)) - args.delay
                                     for s in (False, True))
                    rows.append([str(hospitals), f"{params:,}", f"{1000 * plain:.0f}", f"{1000 * secure:.0f}",
                                 f"{secure / plain:.1f}×"])
    table = Table(title=f"round overhead (round time - the {args.delay:g} s training), medians, ms")
    header = ["hospitals", "parameters", "plain FedAvg", "secure aggregation", "secure / plain"]
    for column in header:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header),
             *("| " + " | ".join(r) + " |" for r in rows)]
    RESULT.write_text("# Secure aggregation: round overhead through the real aggregator\n\n"
                      f"`python benchmarks/secure_round.py`: {args.rounds} fit rounds, {args.delay:g} s training; "
                      "the round time is the aggregator's (closed_at - opened_at), the overhead that minus the "
                      "training. All hospitals in one process (their cryptography shares its CPUs).\n\n"
                      + "\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"written to {RESULT}")


if __name__ == "__main__":
    main()
