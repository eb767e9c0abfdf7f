"""Federation at scale: whole fit rounds through the real aggregator process over HTTPS, with N simulated hospitals.

The aggregator is the one the CLI runs (`health-mlops aggregator --spec <file>`: a process of its own, mutual TLS,
checkpoints on disk under a fresh HEALTH_MLOPS_HOME). The model is the health-risk task's MLP with its two hidden
layers widened to h units each, h chosen so that the global weights hold about P float32 parameters
(P = h² + 30 h + 1 with the task's 27 encoded columns): the spec's `model.hidden` is the public way to size a
model, so the run is started as an admin starts one (`POST /v1/runs`).

The hospitals: ONE process (this one) plays N hospital identities, a thread each with the synchronous httpx client
a node uses (httpx's asyncio client encrypts about 4x slower on this machine, 195 against 710 MB/s into the same
sink, which would make the hospitals the bottleneck), each with its own client certificate and token from
`provision` and its own kept-alive connection. Each long-polls `GET /v1/tasks/next`, answers the round-0 `stats`
task at once (made-up counts and sums of the right length), and answers each `fit` task `--delay` seconds after
receiving it (the same delay for all: it is the slowest hospital's delay) with a precomputed update: the run's
initial global weights (`initial_weights`, as the aggregator makes them; checked afterwards against the round-1
weights it kept) plus seeded noise 1e-4 N(0, 1), float32, same tensor names and shapes, as one safetensors body
with fit metadata (`encode_weights`), made before the run. Hospitals do not download the round's weights (their
bodies are precomputed), so a round here is: tasks go out, N bodies come in, the aggregator validates, writes and
folds each, closes the round and checkpoints. Leases are 600 s (longer delays would heartbeat every lease/3). The
run has `--rounds` fit rounds (default 2) with FedAvg unless told; its final `evaluate` round is not answered and
the run is cancelled, so no model is exported or registered.

Per fit round, all observed from this process:
- round time: from the round's `opened_at` in the run view (the aggregator's clock, when it made the round's
  tasks) to the arrival here of the round's last answer (same host, both `time.time()`). Answers wait for their
  own checkpoint, written in order by one thread, so the last is the answer to the result that closed the round,
  sent once the closing checkpoint (state + the next round's weights) is durable: aggregation and checkpoint are
  included. ("agg. view": the view's own closed_at - opened_at, taken before the closing's work.)
- round overhead: round time - the delay.
- receive time: the same N bodies POSTed at once (N threads released together, on connections already open) to a
  trivial loopback sink: this file run as a process of its own (`--sink-port`) under uvicorn with the aggregator's
  HTTP protocol (`GuardedHttpProtocol`) and mutual TLS server context, reading each body and keeping nothing.
  From the release to the last answer; `--rounds` times (half before the run, half after, never while the
  aggregator works), median.
- aggregator peak RSS: its VmHWM (/proc/<pid>/status), reset (`echo 5 > /proc/<pid>/clear_refs`) at the previous
  round's last answer and read at this round's; "above idle" is that peak minus its VmRSS just before the run was
  started (the hospitals connected and polling). VmRSS's parts have no kernel peak, so they are sampled every
  50 ms: RssAnon (the heap) and RssFile (mapped file pages: a result read back memory-mapped counts there while
  its pages are resident and mapped).
- bytes written: its /proc/<pid>/io write_bytes over the same window (every thread: result files, state rewrites,
  the next round's weights, its log). Per accepted result: (the round's bytes - the next round's weights file,
  from health_mlops_checkpoint_bytes_total{file="weights"}) / N: the round's one weights file is the round's
  cost, not the hospitals'. The same metric gives the bytes by file.
Figures are medians over the fit rounds; the RSS peak is the maximum.

Acceptance (issue 14): at 50 x 10M (FedAvg), overhead <= 3x the receive time and peak RSS above idle <= 4x one
update (4P bytes); at every size, checkpoint bytes per accepted result <= 1.1x the result's size + 64 KiB; the round
overhead at 5 x 100k, in ms. The default matrix adds the median at 50 x 10M (a strategy that keeps every update).

Run with `python benchmarks/round_at_scale.py` (N in 5, 50 x P in 100k, 10M, and the median at 50 x 10M; a few
minutes on 2 CPUs, up to 5 GB of memory) to print the tables and write benchmarks/results/round_at_scale.md.
`--hospitals N --params P` runs one size, `--json` prints only a JSON list of rows on stdout, `--profile FILE`
runs the aggregator of one size under cProfile (its event loop thread; the stats written when it stops).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from common import free_ports

from health_mlops.data.preprocess import encoded_columns
from health_mlops.demo.processes import Child, Processes, wait_ready
from health_mlops.fl.messages import decode_weights, encode_weights
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.spec import DatasetSpec, ModelDefaults, load_spec, spec_to_yaml
from health_mlops.trust.credentials import ADMIN, ClientCredential, bearer, provision
from health_mlops.trust.pki import CA, SERVER, cert_path, key_path
from health_mlops.trust.tls import client_context, server_context
from health_mlops.web.server import protocol_options

HOSPITALS = (5, 50)
PARAMS = (100_000, 10_000_000)
STRATEGY = "fedavg"
EXTRA = ("median", 50, 10_000_000)  # a strategy that keeps the updates, at the largest size
SEED = 14
NOISE = 1e-4  # an update's distance from the global weights, per coordinate
DELAY_S = 1.0
LEASE_S = 600.0
POLL_WAIT_S = 5.0  # a long poll is answered the moment a task exists; short, so a failure stops soon
HTTP_TIMEOUT_S = 600.0
EXAMPLES = 1000  # each hospital's (made-up) training rows
# Acceptance (issue 14)
ACCEPT_SIZE = (50, 10_000_000)
ACCEPT_OVERHEAD = 3.0  # x the receive time
ACCEPT_RSS = 4.0  # x one update, above idle
ACCEPT_BYTES_RATIO, ACCEPT_BYTES_CONSTANT = 1.1, 64 * 1024
RESULT = Path(__file__).parent / "results" / "round_at_scale.md"


class BenchmarkError(Exception):
    """A round that could not be measured; the message says why."""


# --- the model ----------------------------------------------------------------------------------------------


def mlp_params(inputs: int, hidden: int) -> int:
    """Parameters of the task's MLP with two hidden layers of `hidden` units (weights and biases)."""
    return inputs * hidden + hidden + hidden * hidden + hidden + hidden + 1


def hidden_for(params: int, inputs: int) -> int:
    """The hidden width whose two-layer MLP is closest to `params` parameters."""
    root = (-(inputs + 3) + math.sqrt((inputs + 3) ** 2 + 4 * (params - 1))) / 2
    return min((max(1, math.floor(root)), math.ceil(root)), key=lambda h: abs(mlp_params(inputs, h) - params))


def sized_spec(params: int, folder: Path) -> tuple[Path, DatasetSpec, int]:
    """A copy of the health-risk spec whose model has about `params` parameters: (its file, it, its exact size)."""
    spec = load_spec("health-risk")
    inputs = len(encoded_columns(spec))
    hidden = hidden_for(params, inputs)
    spec = spec.model_copy(update={"model": ModelDefaults(kind="mlp", hidden=(hidden, hidden))})
    path = folder / f"health-risk-{params}.yaml"
    path.write_text(spec_to_yaml(spec), encoding="utf-8")
    return path, spec, mlp_params(inputs, hidden)


# --- what the hospitals send ----------------------------------------------------------------------------------


def global_weights(spec: DatasetSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The run's initial global weights as the hospitals receive them (float32)."""
    return {name: tensor.astype(np.float32) for name, tensor in initial_weights(spec, seed).items()}


def stats_body(spec: DatasetSpec) -> bytes:
    """A round-0 result: counts and sums of the right length (mean 0, scale 1), nothing suppressed."""
    columns = len(encoded_columns(spec))
    return bytes(encode_weights({}, {"count": EXAMPLES, "sums": [0.0] * columns,
                                     "sums_of_squares": [float(EXAMPLES)] * columns, "target_sum": 100.0,
                                     "target_sum_of_squares": 100.0}))


def fit_bodies(base: dict[str, np.ndarray], hospitals: int, delay_s: float, seed: int) -> list[bytes]:
    """Each hospital's fit result: the global weights plus its own small noise, with fit metadata."""
    metadata = {"num_examples": EXAMPLES, "num_test_examples": EXAMPLES // 4, "metrics": {"auc": 0.7},
                "train_loss": 0.5, "compute_seconds": delay_s}
    bodies = []
    for hospital in range(hospitals):
        rng = np.random.default_rng([seed, hospital])
        update = {}
        for name, tensor in base.items():
            noise = rng.standard_normal(tensor.shape, dtype=np.float32)
            noise *= np.float32(NOISE)
            noise += tensor
            update[name] = noise
        bodies.append(bytes(encode_weights(update, metadata)))
    return bodies


# --- the aggregator's process, seen from /proc --------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and VmRSS's parts (RssAnon: heap; RssFile: mapped file pages) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            found[name] = int(value.split()[0]) * 1024
    return found


class RssSampler:
    """Samples a process's RssAnon and RssFile every `interval_s` in a thread: the kernel keeps a peak of their
    sum only (VmHWM), and a memory-mapped result file's pages count in RSS as file pages, not heap."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid, self.interval_s = pid, interval_s
        self._peaks = {"RssAnon": 0, "RssFile": 0}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                status = proc_status(self.pid)
            except OSError:
                return
            with self._lock:
                for name in self._peaks:
                    self._peaks[name] = max(self._peaks[name], status[name])

    def take(self) -> dict[str, int]:
        """The peaks since the last `take`, and start afresh."""
        with self._lock:
            peaks, self._peaks = self._peaks, dict.fromkeys(self._peaks, 0)
        return peaks


def reset_peak(pid: int) -> None:
    """Set the process's VmHWM to its current RSS (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def proc_io(pid: int) -> dict[str, int]:
    """write_bytes and cancelled_write_bytes of a process (all its threads)."""
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    return {k: int(v) for k, _, v in (line.partition(": ") for line in lines)}


def metric_sums(text: str, name: str) -> dict[str, float]:
    """A Prometheus text metric's samples by their label set (or '' without labels)."""
    found = {}
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.MULTILINE):
        found[match[1] or ""] = float(match[2])
    return found


@dataclass
class Mark:
    """The aggregator when the answer to a round's closing result arrived here."""

    round: int
    at: float  # time.time()
    peak_rss: int  # VmHWM since the previous mark
    rss: int  # VmRSS (the next round starts from here)
    written: int
    cancelled: int
    sampled: dict[str, int]  # sampled peaks of RssAnon and RssFile since the previous mark


def mark(pid: int, round_number: int, sampler: RssSampler) -> Mark:
    at = time.time()
    status = proc_status(pid)
    io = proc_io(pid)
    reset_peak(pid)
    sampled = sampler.take()
    for name in sampled:
        sampled[name] = max(sampled[name], status[name])
    return Mark(round_number, at, status["VmHWM"], proc_status(pid)["VmRSS"], io["write_bytes"],
                io["cancelled_write_bytes"], sampled)


# --- the simulated hospitals ----------------------------------------------------------------------------------


def hospital_client(base_url: str, credential: ClientCredential) -> httpx.Client:
    """A hospital's own connection: its certificate (mutual TLS) and token, as `fl/client.py` presents them."""
    verify = client_context(credential.certificate, credential.key, credential.ca)
    return httpx.Client(base_url=base_url, verify=verify, timeout=HTTP_TIMEOUT_S,
                        headers={**bearer(credential.token), "X-Node-Id": f"{credential.name}-sim"})


@dataclass
class Federation:
    """N hospitals in this process against one aggregator, a thread each (the sync client a node uses; httpx's
    async client encrypts 4x slower here, which would make the hospitals the bottleneck): each answers its
    tasks; the last answer of each round marks it."""

    clients: dict[str, httpx.Client]
    stats: bytes
    bodies: dict[str, bytes]
    delay_s: float
    pid: int
    ops: httpx.Client  # the aggregator's operations port
    sampler: RssSampler
    marks: list[Mark] = field(default_factory=list)
    answered: dict[int, int] = field(default_factory=dict)  # round -> results answered
    metrics_before: list[str] = field(default_factory=list)  # /metrics when round 0 closed
    fetching: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def play(self, start_run: Callable[[], None]) -> None:
        """Every hospital in its thread, polling; `start_run()` once they are connected; back when the run has
        reached its evaluate round (not answered) or a hospital failed."""
        threads = [threading.Thread(target=self.hospital, args=(n,), name=n) for n in self.clients]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)  # every hospital connected and polling
            start_run()
        except BaseException:
            self.stopping.set()
            raise
        finally:
            for thread in [*threads, *([self.fetching] if self.fetching else [])]:
                thread.join()
        if self.errors:
            raise self.errors[0]

    def metrics(self) -> str:
        return self.ops.get("/metrics").raise_for_status().text

    def hospital(self, name: str) -> None:
        try:
            self._answer_tasks(name)
        except BaseException as error:  # noqa: BLE001 - handed to `play`, which raises it
            self.errors.append(error)
            self.stopping.set()

    def _answer_tasks(self, name: str) -> None:
        client = self.clients[name]
        while not self.stopping.is_set():
            response = client.get("/v1/tasks/next", params={"wait": POLL_WAIT_S})
            if response.status_code == 204:
                continue
            task = response.raise_for_status().json()
            if task["kind"] == "evaluate":
                return
            if task["kind"] == "fit":
                self.hold(client, task["id"], task["lease_s"])
            body = self.stats if task["kind"] == "stats" else self.bodies[name]
            answer = client.post(f"/v1/tasks/{task['id']}/result", content=body,
                                 headers={"Content-Type": "application/octet-stream"})
            if answer.status_code != 200:
                raise BenchmarkError(f"{name}: result of {task['id']} refused ({answer.status_code}): {answer.text}")
            # The round's last answer: the one to the result that closed it (each answer waits for its own
            # checkpoint, written in order by one thread, and the closing result's is the last).
            with self.lock:
                self.answered[task["round"]] = self.answered.get(task["round"], 0) + 1
                if self.answered[task["round"]] == len(self.clients):
                    self.marks.append(mark(self.pid, task["round"], self.sampler))
                    if task["round"] == 0:  # fetched beside the hospitals, not in their way
                        self.fetching = threading.Thread(target=lambda: self.metrics_before.append(self.metrics()))
                        self.fetching.start()

    def hold(self, client: httpx.Client, task_id: str, lease_s: float) -> None:
        """Wait out the delay (the hospital's compute), keeping the lease alive if the delay outlasts it."""
        deadline = time.monotonic() + self.delay_s
        while (remaining := deadline - time.monotonic()) > 0 and not self.stopping.is_set():
            time.sleep(min(remaining, lease_s / 3))
            if deadline - time.monotonic() > 0:
                client.post(f"/v1/tasks/{task_id}/heartbeat").raise_for_status()


def post_to_sink(clients: Sequence[httpx.Client], bodies: Sequence[bytes]) -> float:
    """Seconds to POST every body at once to the sink, each from its own thread on its own open connection."""
    answers: list[httpx.Response | BaseException] = [BenchmarkError("no answer")] * len(clients)
    barrier = threading.Barrier(len(clients) + 1)

    def post(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = clients[i].post("/sink", content=bodies[i])
        except Exception as error:  # noqa: BLE001 - reported below
            answers[i] = error

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for answer, body in zip(answers, bodies):
        if isinstance(answer, BaseException):
            raise answer
        if answer.status_code != 200 or answer.json()["received"] != len(body):
            raise BenchmarkError(f"the sink answered {answer.status_code}: {answer.text}")
    return seconds


# --- one size -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    strategy: str
    hospitals: int
    params: int  # exact
    update_bytes: int  # one fit result body (4P + header)
    delay_s: float
    round_seconds: float  # median over the fit rounds
    aggregator_view_seconds: float  # closed_at - opened_at in the run view (before the closing's work)
    overhead_seconds: float
    receive_seconds: float  # median
    idle_rss: int
    idle_anon: int
    idle_file: int  # the libraries it has mapped, mostly
    peak_rss: int  # max over the fit rounds
    sampled_peak_anon: int  # sampled every 50 ms (the kernel keeps no peak of the parts)
    sampled_peak_file: int
    round_start_rss: int  # RSS when the first measured round's window began
    written_per_round: int  # median
    weights_file_bytes: int  # the next round's weights, per round
    state_bytes_per_round: int  # from the metric
    result_bytes_per_round: int  # from the metric
    cancelled_per_round: int
    checkpoint_seconds_per_round: float  # the aggregator's own checkpoint duration histogram, summed
    rounds: int
    round_seconds_each: list[float] = field(default_factory=list)
    receive_seconds_each: list[float] = field(default_factory=list)

    @property
    def peak_above_idle(self) -> int:
        return self.peak_rss - self.idle_rss

    @property
    def per_result(self) -> float:
        return (self.written_per_round - self.weights_file_bytes) / self.hospitals

    @property
    def per_result_excess(self) -> float:
        return self.per_result - ACCEPT_BYTES_RATIO * self.update_bytes

    def public(self) -> dict[str, object]:
        return {**asdict(self), "peak_above_idle": self.peak_above_idle, "bytes_per_result": self.per_result,
                "params_label": size_label(self.params)}


@dataclass
class Setup:
    """What every size shares: the scratch folder, credentials for the most hospitals, the sink."""

    root: Path
    credentials: Path
    processes: Processes
    sink_url: str


def measure(setup: Setup, strategy: str, hospitals: int, params: int, *, rounds: int, delay_s: float,
            seed: int, profile: Path | None, console: Console) -> Measurement:
    home = setup.root / f"{strategy}-{hospitals}-{params}"
    home.mkdir()
    spec_path, spec, exact = sized_spec(params, home)
    label = f"{strategy} {hospitals} x {size_label(exact)}"
    console.log(f"{label}: precomputing {hospitals} updates of {exact:,} parameters")
    base = global_weights(spec)
    bodies = fit_bodies(base, hospitals, delay_s, seed)
    names = [f"hospital-{i}" for i in range(1, hospitals + 1)]
    aggregator, api, ops = start_aggregator(setup, home, spec_path, f"aggregator-{home.name}", profile)
    pid = aggregator.process.pid
    credentials = {n: ClientCredential.from_directory(setup.credentials, n) for n in [ADMIN, *names]}
    try:
        with ExitStack() as stack:
            clients = {n: stack.enter_context(hospital_client(api, credentials[n])) for n in names}
            sinks = [stack.enter_context(hospital_client(setup.sink_url, credentials[n])) for n in names]
            admin = stack.enter_context(hospital_client(api, credentials[ADMIN]))
            ops_client = stack.enter_context(httpx.Client(base_url=ops, timeout=HTTP_TIMEOUT_S))
            for sink in sinks:  # connections open, as the hospitals' are when they answer
                sink.post("/sink", content=b"").raise_for_status()
            console.log(f"{label}: receive time (sink)")
            before_run = rounds // 2 or 1
            receive = [post_to_sink(sinks, bodies) for _ in range(before_run)]
            sampler = stack.enter_context(RssSampler(pid))
            federation = Federation(clients, stats_body(spec), dict(zip(names, bodies)), delay_s, pid, ops_client,
                                    sampler)
            config = {"rounds": rounds, "min_hospitals": hospitals, "lease_s": LEASE_S,
                      "round_deadline_s": 4 * LEASE_S, "strategy": {"name": strategy}}
            run: dict[str, Any] = {}

            def start_run() -> None:
                run["idle"] = proc_status(pid)
                console.log(f"{label}: the run ({rounds} fit rounds)")
                started = admin.post("/v1/runs", json={"config": config, "hospitals": names})
                if started.status_code != 201:
                    raise BenchmarkError(f"the run was refused ({started.status_code}): {started.text}")
                run["id"] = started.json()["id"]

            federation.play(start_run)
            metrics_after = federation.metrics()
            view = admin.get(f"/v1/runs/{run['id']}").raise_for_status().json()
            sent = admin.get(f"/v1/runs/{run['id']}/rounds/1/weights").raise_for_status().content
            admin.post(f"/v1/runs/{run['id']}/cancel").raise_for_status()
            receive += [post_to_sink(sinks, bodies) for _ in range(rounds - before_run)]
    except BaseException:
        console.print(f"the end of {aggregator.log_path}:\n{aggregator.log_tail()}", markup=False)
        raise
    finally:
        setup.processes.children.pop(aggregator.name)
        stop(aggregator)
    check_run(view, decode_weights(sent)[0], base, hospitals, rounds, federation.marks)
    measurement = summarise(strategy, hospitals, exact, len(bodies[0]), delay_s, view, federation.marks, receive,
                            run["idle"], (federation.metrics_before[0], metrics_after))
    shutil.rmtree(home, ignore_errors=True)
    return measurement


def start_aggregator(setup: Setup, home: Path, spec_path: Path, name: str,
                     profile: Path | None) -> tuple[Child, str, str]:
    """`health-mlops aggregator` as the CLI runs it (optionally under cProfile); its API and ops URLs."""
    port = free_ports(2)
    args = ["aggregator", "--port", str(port), "--ops-port", str(port + 1), "--spec", str(spec_path)]
    env = {"HEALTH_MLOPS_HOME": str(home), "HEALTH_MLOPS_CREDENTIALS_DIR": str(setup.credentials)}
    if profile is None:
        child = setup.processes.start(name, args, env=env)
    else:
        child = setup.processes.start_program(name, [sys.executable, "-m", "cProfile", "-o", str(profile), "-m",
                                                     "health_mlops.cli", *args], env=env)
    wait_ready(f"http://127.0.0.1:{port + 1}/readyz", child)
    return child, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"


def stop(child: Child) -> None:
    """SIGINT, SIGKILL after a minute. uvicorn re-raises the signal it stopped on once it has shut down: SIGINT
    then unwinds Python (KeyboardInterrupt), so a profiled aggregator writes its stats; SIGTERM would not."""
    if child.process.poll() is None:
        child.process.send_signal(signal.SIGINT)
        try:
            child.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()
    child.log.close()


def check_run(view: dict[str, Any], sent: dict[str, np.ndarray], base: dict[str, np.ndarray], hospitals: int,
              rounds: int, marks: Sequence[Mark]) -> None:
    """The run did what was measured: every fit round closed with every hospital's result, nothing refused, and
    the updates were made around the very weights the aggregator sent."""
    fits = [r for r in view["history"] if r["kind"] == "fit"]
    if len(fits) != rounds or any(len(r["hospitals"]) != hospitals for r in fits) or view["rejected"]:
        raise BenchmarkError(f"the run did not go as planned: {len(fits)} fit rounds, rejected {view['rejected']}")
    if [m.round for m in marks] != list(range(rounds + 1)):
        raise BenchmarkError(f"closing answers seen for rounds {[m.round for m in marks]}")
    if set(sent) != set(base) or any(not np.array_equal(sent[n], base[n]) for n in base):
        raise BenchmarkError("the aggregator's round-1 weights differ from the base the updates were made from")


def summarise(strategy: str, hospitals: int, params: int, update_bytes: int, delay_s: float, view: dict[str, Any],
              marks: Sequence[Mark], receive: Sequence[float], idle: dict[str, int],
              metrics: tuple[str, str]) -> Measurement:
    """One size's figures: per fit round r, the window from round r-1's closing answer to round r's."""
    fits = {r["round"]: r for r in view["history"] if r["kind"] == "fit"}
    rounds = len(fits)
    round_seconds = [marks[r].at - fits[r]["opened_at"] for r in fits]
    written = [marks[r].written - marks[r - 1].written for r in fits]
    cancelled = [marks[r].cancelled - marks[r - 1].cancelled for r in fits]
    # Over the fit rounds' windows (from round 0's closing answer on): by file, and the checkpoint's own time.
    before, after = (metric_sums(m, "health_mlops_checkpoint_bytes_total") for m in metrics)
    per_file = {k.split('"')[1]: (after[k] - before.get(k, 0.0)) / rounds for k in after}
    durations = [metric_sums(m, "health_mlops_checkpoint_duration_seconds_sum").get("", 0.0) for m in metrics]
    return Measurement(
        strategy=strategy, hospitals=hospitals, params=params, update_bytes=update_bytes, delay_s=delay_s,
        round_seconds=statistics.median(round_seconds),
        aggregator_view_seconds=statistics.median(r["closed_at"] - r["opened_at"] for r in fits.values()),
        overhead_seconds=statistics.median(round_seconds) - delay_s, receive_seconds=statistics.median(receive),
        idle_rss=idle["VmRSS"], idle_anon=idle["RssAnon"],
        idle_file=idle["RssFile"], peak_rss=max(marks[r].peak_rss for r in fits),
        sampled_peak_anon=max(marks[r].sampled["RssAnon"] for r in fits),
        sampled_peak_file=max(marks[r].sampled["RssFile"] for r in fits), round_start_rss=marks[0].rss,
        written_per_round=int(statistics.median(written)), weights_file_bytes=int(per_file.get("weights", 0.0)),
        state_bytes_per_round=int(per_file.get("state", 0.0)), result_bytes_per_round=int(per_file.get("result", 0.0)),
        cancelled_per_round=int(statistics.median(cancelled)),
        checkpoint_seconds_per_round=(durations[1] - durations[0]) / rounds, rounds=rounds,
        round_seconds_each=round_seconds, receive_seconds_each=list(receive))


# --- the sink: a process of its own -----------------------------------------------------------------------------


async def sink_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads a request's body, keeps nothing of it, answers how many bytes came."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    received, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"received": received}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_sink(port: int, credentials: Path) -> None:
    """The sink on loopback with the aggregator's HTTP protocol and mutual TLS server context."""
    import uvicorn

    tls = server_context(cert_path(credentials, SERVER), key_path(credentials, SERVER),
                         client_ca=cert_path(credentials, CA))
    uvicorn.run(sink_app, host="127.0.0.1", port=port, log_level="warning", **protocol_options(tls))


def start_sink(processes: Processes, credentials: Path) -> str:
    port = free_ports(1)
    child = processes.start_program("sink", [sys.executable, __file__, "--sink-port", str(port),
                                             "--credentials", str(credentials)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise BenchmarkError(f"the sink exited: {child.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"https://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise BenchmarkError(f"the sink did not listen on {port}")


# --- report -------------------------------------------------------------------------------------------------


def source_version() -> str:
    """Which health_mlops was measured: its commit (and whether its src has uncommitted changes), or its path."""
    import health_mlops

    src = Path(health_mlops.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "."], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"health_mlops from {src}"
    return f"commit {commit}" + (" with uncommitted changes in src" if dirty else "")


def size_label(params: int) -> str:
    return f"{round(params / 1e6):g}M" if params >= 1_000_000 else f"{round(params / 1e3):g}k"


def mb(value: float) -> str:
    return f"{value / 2**20:,.1f}"


def seconds(value: float) -> str:
    return f"{1000 * value:.0f} ms" if value < 1 else f"{value:.2f} s"


HEADERS = ("strategy", "N", "P", "update MB", "round", "agg. view", "overhead", "receive", "overhead / receive",
           "idle RSS MB", "peak above idle MB", "peak above idle / update", "written MB / round",
           "per result / update", "per result - 1.1 x update KiB", "rounds")


def cells(m: Measurement) -> list[str]:
    return [m.strategy, str(m.hospitals), f"{m.params:,}", mb(m.update_bytes), seconds(m.round_seconds),
            seconds(m.aggregator_view_seconds), seconds(m.overhead_seconds), seconds(m.receive_seconds),
            f"{m.overhead_seconds / m.receive_seconds:.2f}x", mb(m.idle_rss), mb(m.peak_above_idle),
            f"{m.peak_above_idle / (4 * m.params):.2f}x", mb(m.written_per_round),
            f"{m.per_result / m.update_bytes:.3f}x", f"{m.per_result_excess / 1024:,.0f}", str(m.rounds)]


DETAIL_HEADERS = ("strategy", "N", "P", "rounds s", "receive s", "RSS at round start - idle MB",
                  "sampled peak heap - idle MB", "sampled peak file pages - idle MB", "results MB",
                  "state KiB", "weights MB", "deleted before writeback MB", "checkpoint s / round")


def detail_cells(m: Measurement) -> list[str]:
    return [m.strategy, str(m.hospitals), size_label(m.params), ", ".join(f"{s:.3f}" for s in m.round_seconds_each),
            ", ".join(f"{s:.3f}" for s in m.receive_seconds_each), mb(m.round_start_rss - m.idle_rss),
            mb(m.sampled_peak_anon - m.idle_anon), mb(m.sampled_peak_file - m.idle_file),
            mb(m.result_bytes_per_round), f"{m.state_bytes_per_round / 1024:,.0f}", mb(m.weights_file_bytes),
            mb(m.cancelled_per_round), f"{m.checkpoint_seconds_per_round:.3f}"]


def verdicts(measurements: Sequence[Measurement]) -> list[str]:
    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    def name(m: Measurement) -> str:
        return f"{m.strategy} {m.hospitals} x {size_label(m.params)}"

    lines = []
    scale = (ACCEPT_SIZE[0], size_label(ACCEPT_SIZE[1]))
    for m in measurements:
        if (m.hospitals, size_label(m.params)) != scale or m.strategy != STRATEGY:
            continue
        ratio, rss = m.overhead_seconds / m.receive_seconds, m.peak_above_idle / (4 * m.params)
        lines.append(f"{name(m)}: round overhead {m.overhead_seconds:.2f} s = {ratio:.2f}x the receive time "
                     f"{m.receive_seconds:.2f} s (acceptance <= {ACCEPT_OVERHEAD:g}x): {yes(ratio <= ACCEPT_OVERHEAD)}")
        lines.append(f"{name(m)}: aggregator peak RSS {mb(m.peak_above_idle)} MB above idle = {rss:.2f}x one update "
                     f"(acceptance <= {ACCEPT_RSS:g}x): {yes(rss <= ACCEPT_RSS)}")
    over = [m for m in measurements if m.per_result_excess > ACCEPT_BYTES_CONSTANT]
    lines.append(f"checkpoint bytes per accepted result <= {ACCEPT_BYTES_RATIO:g}x the result + "
                 f"{ACCEPT_BYTES_CONSTANT // 1024} KiB at every size: {yes(not over)}"
                 + "".join(f"; {name(m)}: {m.per_result / m.update_bytes:.3f}x, "
                           f"+{m.per_result_excess / 1024:,.0f} KiB" for m in over))
    for m in measurements:
        if (m.hospitals, size_label(m.params), m.strategy) == (5, "100k", STRATEGY):
            lines.append(f"{name(m)}: round overhead {1000 * m.overhead_seconds:.0f} ms (round "
                         f"{1000 * m.round_seconds:.0f} ms with a {1000 * m.delay_s:.0f} ms delay)")
    for m in measurements:
        if m.strategy != STRATEGY:
            ratio = m.overhead_seconds / m.receive_seconds
            lines.append(f"{name(m)}: round overhead {m.overhead_seconds:.2f} s ({ratio:.2f}x the receive time), "
                         f"aggregator peak RSS {mb(m.peak_rss)} MB, {mb(m.peak_above_idle)} MB above "
                         f"idle = {m.peak_above_idle / (4 * m.params):.1f}x one update")
    return lines


def markdown(measurements: Sequence[Measurement], command: str, minutes: float, version: str,
             load: tuple[float, float]) -> str:
    lines = ["# Federation round at scale", "",
             f"`{command}`, {version}, {os.cpu_count()} CPUs (1-min load average {load[0]:.1f} at the start, "
             f"{load[1]:.1f} at the end), {minutes:.1f} min. The real aggregator process "
             "(the CLI, mutual TLS, checkpoints on disk) and ONE process playing N hospitals (a thread and a client "
             "certificate each); FedAvg unless named; the model: the health-risk MLP widened to P float32 "
             f"parameters. Each hospital answers its fit task {1000 * measurements[0].delay_s:.0f} ms after receiving "
             "it with a precomputed update. round: from the round's opening (aggregator clock) to its last answer "
             "(the closing result's, sent after the closing checkpoint); agg. view: the run view's closed_at - "
             "opened_at (taken before aggregation and checkpoint); overhead: round - delay; receive: the same N "
             "bodies POSTed at once to a trivial sink process with the aggregator's uvicorn protocol and mutual TLS; "
             "peak: the aggregator's VmHWM over the round; idle: its VmRSS before the run started (heap: RssAnon, file "
             "pages: RssFile, sampled every 50 ms); written: its "
             "/proc io write_bytes over the round; per result: (written - the next round's weights file) / N. "
             "Medians over the rounds, the peak their maximum. Method: the docstring of "
             "benchmarks/round_at_scale.py.", "",
             "| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1)]
    lines += ["| " + " | ".join(cells(m)) + " |" for m in measurements]
    lines += ["", "Each round's and each receive measurement (s); per round: the RSS the run holds when it starts "
              "(above idle), the bytes by file (the aggregator's health_mlops_checkpoint_bytes_total), the bytes "
              "deleted before they reached the disk, and the checkpoint's own time "
              "(health_mlops_checkpoint_duration_seconds: state and weights writes, not result files)", "",
              "| " + " | ".join(DETAIL_HEADERS) + " |", "|---|" + "---:|" * (len(DETAIL_HEADERS) - 1)]
    lines += ["| " + " | ".join(detail_cells(m)) + " |" for m in measurements]
    lines += ["", *(f"- {line}" for line in verdicts(measurements))]
    return "\n".join(lines) + "\n"


def print_report(console: Console, measurements: Sequence[Measurement]) -> None:
    table = Table(title=f"A whole fit round through the aggregator process, {os.cpu_count()} CPUs")
    for name in HEADERS:
        table.add_column(name, justify="left" if name == "strategy" else "right")
    for m in measurements:
        table.add_row(*cells(m))
    console.print(table)
    detail = Table(title="Each round and receive measurement; per round: the RSS the run holds, the bytes by file, "
                         "the checkpoint's time")
    for name in DETAIL_HEADERS:
        detail.add_column(name, justify="left" if name == "strategy" else "right")
    for m in measurements:
        detail.add_row(*detail_cells(m))
    console.print(detail)
    for line in verdicts(measurements):
        console.print(line.replace("**", ""))


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, nargs="+", default=list(HOSPITALS))
    parser.add_argument("--params", type=int, nargs="+", default=list(PARAMS))
    parser.add_argument("--strategies", nargs="+", default=None,
                        help=f"default: {STRATEGY} at every size, and {EXTRA[0]} at {EXTRA[1]} x "
                             f"{size_label(EXTRA[2])}")
    parser.add_argument("--rounds", type=int, default=2, help="fit rounds measured per size")
    parser.add_argument("--delay", type=float, default=DELAY_S, help="seconds each hospital takes to answer a fit task")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--json", action="store_true", help="print only a JSON list of rows on stdout")
    parser.add_argument("--profile", type=Path, help="run the aggregator under cProfile, its stats to this file")
    parser.add_argument("--out", type=Path, default=RESULT, help="markdown result (not written with --json)")
    parser.add_argument("--sink-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--credentials", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink_port is not None:
        serve_sink(args.sink_port, args.credentials)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the children, remove the files
    plan = [(s, n, p) for s in (args.strategies or [STRATEGY]) for n in args.hospitals for p in args.params]
    if args.strategies is None and EXTRA[1] in args.hospitals and EXTRA[2] in args.params:
        plan.append(EXTRA)
    if args.profile is not None and len(plan) != 1:
        parser.error("--profile runs one size: give one --hospitals, one --params and one --strategies")
    console = Console(width=200, stderr=args.json)
    started, load = time.perf_counter(), os.getloadavg()[0]
    version = source_version()
    console.log(f"measuring health_mlops at {version}")
    measurements = []
    with tempfile.TemporaryDirectory(prefix="health-mlops-round-at-scale-") as scratch:
        root = Path(scratch)
        credentials = root / "credentials"
        provision(credentials, [f"hospital-{i}" for i in range(1, max(args.hospitals) + 1)])
        with Processes(root / "logs", {**os.environ}) as processes:
            setup = Setup(root, credentials, processes, start_sink(processes, credentials))
            for strategy, hospitals, params in plan:
                measurements.append(measure(setup, strategy, hospitals, params, rounds=args.rounds,
                                            delay_s=args.delay, seed=args.seed, profile=args.profile,
                                            console=console))
    minutes = (time.perf_counter() - started) / 60
    if args.json:
        json.dump([m.public() for m in measurements], sys.stdout)
        sys.stdout.write("\n")
        return
    print_report(console, measurements)
    console.print(f"{len(plan)} sizes in {minutes:.1f} min; 1-min load average {load:.1f} at the start, "
                  f"{os.getloadavg()[0]:.1f} at the end")
    command = "python benchmarks/round_at_scale.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(measurements, command, minutes, version, (load, os.getloadavg()[0])))
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
