"""What a prediction costs on top of an HTTP request, and how that compares with `mlflow models serve`.

One run, one machine, one model (a federated run's champion, trained here first):
  no-op     `POST /api/v1/noop` of the same app and server (`health-mlops dashboard` with its defaults): reads
            the same body, answers a fixed object; the ceiling for predict
  predict   `POST /api/v1/predict`, one patient per request
  mlflow    `mlflow models serve` on the same ONNX model, one patient per request
wrk (Debian's package) drives each with 64 connections; no-op and predict alternate over several rounds and
the medians are reported. Then a 100,000-row batch goes through `POST /api/v1/predict/batch` end to end (the
client builds the JSON, sends it, parses the answer).

Run with `make bench` (or `python benchmarks/serving.py [--seconds S] [--rounds R]`); the table goes to
benchmarks/results/serving.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pandas as pd

from common import free_ports

from health_mlops.demo.processes import Processes, wait_ready
from health_mlops.registry import Registry
from health_mlops.spec import load_spec

RESULTS = Path(__file__).parent / "results" / "serving.md"
CONNECTIONS = 64
BATCH_ROWS = 100_000


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, body: str, seconds: int, scratch: Path) -> WrkResult:
    script = scratch / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [==[{body}]==]\n", encoding="utf-8")  # a long string that JSON's ]] cannot end
    out = subprocess.run(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
                     p50_ms=_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
                     p99_ms=_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
                     errors=errors + (int(non_2xx.group(1)) if non_2xx else 0))


def median_result(results: list[WrkResult]) -> WrkResult:
    return WrkResult(statistics.median(r.requests_per_s for r in results),
                     statistics.median(r.p50_ms for r in results), statistics.median(r.p99_ms for r in results),
                     sum(r.errors for r in results))


def patients(data: Path, spec_name: str, count: int) -> list[dict]:
    spec = load_spec(spec_name)
    frame = pd.concat(pd.read_csv(path, dtype=str) for path in sorted(data.glob("hospital-*/*.csv")))
    rows = frame[[f.name for f in spec.features]].to_dict(orient="records")
    for row in rows:  # numbers as numbers, categories as their text, as a client would send them
        for feature in spec.features:
            row[feature.name] = float(row[feature.name]) if feature.type == "numeric" else str(row[feature.name])
    return [rows[i % len(rows)] for i in range(count)]


def batch_seconds(url: str, rows: list[dict], repeats: int) -> list[float]:
    timings = []
    with httpx.Client(timeout=120) as client:
        for _ in range(repeats):
            started = time.perf_counter()
            response = client.post(url, content=msgspec.json.encode({"rows": rows}),
                                   headers={"Content-Type": "application/json"})
            response.raise_for_status()
            assert len(msgspec.json.decode(response.content)["predictions"]) == len(rows)
            timings.append(time.perf_counter() - started)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="no-op/predict alternations")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: `apt-get install wrk` (make bench installs it)")
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch_name:
        scratch = Path(scratch_name)
        # mlflow starts `uvicorn` by name: the venv's bin must be on the PATH.
        env = {**os.environ, "HEALTH_MLOPS_HOME": str(scratch / "home"),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        print("training a champion: `health-mlops demo` with 3 hospitals, 3 rounds…", flush=True)
        base_port = free_ports(12)
        demo = subprocess.run([bin_dir / "health-mlops", "demo", "--hospitals", "3", "--rows-per-hospital", "2000",
                               "--rounds", "3", "--json", "--port", str(base_port), "--node-api-port",
                               str(base_port + 1), "--node-metrics-port", str(base_port + 10)],
                              env=env, check=True, capture_output=True, text=True)
        data = Path(json.loads(demo.stdout)["data"])
        registry = Registry(scratch / "home", "health-risk")
        champion = registry.champion()
        assert champion is not None, "the federated run registered no champion"
        onnx_model, _ = registry.load_artifacts(champion.version)
        mlflow_model = scratch / "mlflow-model"
        import mlflow.onnx
        import onnx

        mlflow.onnx.save_model(onnx.load_from_string(onnx_model), str(mlflow_model))
        rows = patients(data, "health-risk", BATCH_ROWS)
        one = json.dumps(rows[0])
        spec = load_spec("health-risk")
        mlflow_row = json.dumps({"inputs": {"features": [[float(rows[0][f.name]) if f.type == "numeric" else float(
            f.categories.index(rows[0][f.name])) for f in spec.features]]}})  # type: ignore[union-attr]

        ours_port = free_ports(2)
        mlflow_port = ours_port + 1
        with Processes(scratch / "logs", env) as processes:
            ours = processes.start("dashboard", ["dashboard", "--port", str(ours_port)])
            served = processes.start_program("mlflow", [str(bin_dir / "mlflow"), "models", "serve", "-m",
                                                        str(mlflow_model), "--env-manager", "local", "--host",
                                                        "127.0.0.1", "--port", str(mlflow_port)])
            base = f"http://127.0.0.1:{ours_port}"
            wait_ready(f"{base}/readyz", ours)
            while httpx.get(f"{base}/api/v1/model").json()["version"] != champion.version:
                time.sleep(0.2)
            wait_ready(f"http://127.0.0.1:{mlflow_port}/ping", served, timeout_s=180)
            check = httpx.post(f"http://127.0.0.1:{mlflow_port}/invocations", content=mlflow_row,
                               headers={"Content-Type": "application/json"})
            assert check.status_code == 200, check.text
            ours_answer = httpx.post(f"{base}/api/v1/predict", content=one,
                                     headers={"Content-Type": "application/json"}).json()["prediction"]
            theirs = check.json()["predictions"]
            theirs_answer = (theirs.get("prediction") if isinstance(theirs, dict) else theirs)[0]
            assert abs(ours_answer - theirs_answer) < 1e-5, (ours_answer, theirs)  # the same model, both sides
            noop_runs, predict_runs = [], []
            for round_number in range(args.rounds):
                print(f"round {round_number + 1}/{args.rounds}: no-op, predict", flush=True)
                noop_runs.append(wrk(f"{base}/api/v1/noop", one, args.seconds, scratch))
                predict_runs.append(wrk(f"{base}/api/v1/predict", one, args.seconds, scratch))
            print("mlflow models serve…", flush=True)
            mlflow_result = wrk(f"http://127.0.0.1:{mlflow_port}/invocations", mlflow_row, args.seconds, scratch)
            print(f"batch of {BATCH_ROWS:,} rows…", flush=True)
            batch = batch_seconds(f"{base}/api/v1/predict/batch", rows, repeats=5)
    noop, predict = median_result(noop_runs), median_result(predict_runs)
    report = render(noop, predict, mlflow_result, batch, args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report, encoding="utf-8")
    print(report)


def render(noop: WrkResult, predict: WrkResult, mlflow: WrkResult, batch: list[float],
           args: argparse.Namespace) -> str:
    def row(name: str, r: WrkResult) -> str:
        return (f"| {name} | {r.requests_per_s:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | "
                f"{r.requests_per_s / noop.requests_per_s:.2f} |")

    return "\n".join([
        "# Serving benchmark", "",
        f"`python benchmarks/serving.py` (`make bench`), {os.cpu_count()} cores, wrk -t1 -c{CONNECTIONS}, "
        f"{args.seconds} s per run; no-op and predict: median of {args.rounds} alternating runs.", "",
        "| endpoint | requests/s | p50 ms | p99 ms | errors | × no-op |", "|---|---:|---:|---:|---:|---:|",
        row("no-op (same app)", noop), row("predict", predict), row("mlflow models serve", mlflow), "",
        f"- predict / no-op throughput: **{predict.requests_per_s / noop.requests_per_s:.2f}** (bar ≥ 0.85)",
        f"- predict / mlflow models serve throughput: **{predict.requests_per_s / mlflow.requests_per_s:.1f}×** "
        "(bar ≥ 30×)",
        f"- predict p99 at {CONNECTIONS} connections: **{predict.p99_ms:.1f} ms** (bar ≤ 20 ms)",
        f"- {BATCH_ROWS:,}-row batch end to end: median **{statistics.median(batch):.2f} s** of {len(batch)} "
        f"({', '.join(f'{t:.2f}' for t in batch)}) (bar ≤ 1 s)", ""])


if __name__ == "__main__":
    main()
