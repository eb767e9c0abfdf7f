"""What `make demo` costs in memory and what `health-mlops --help` costs in time, side by side for the checkouts
given (default: this one).

For each checkout: `health-mlops --help` timed five times (median), then `health-mlops demo` (5 hospitals × 4000
rows, 20 rounds, as `make demo` runs it) started on free ports; once its dashboard answers, the resident memory
(VmRSS) of every process it started is read from /proc and summed. Every checkout runs with this venv's
libraries and its own code (`PYTHONPATH=<checkout>/src`), and a fresh `HEALTH_MLOPS_HOME`.

    python benchmarks/demo_memory.py                         # this checkout
    python benchmarks/demo_memory.py /tmp/before /work/main  # two checkouts, side by side, with the ratio
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from common import free_ports

READY_TIMEOUT_S = 900.0


def environment(checkout: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout / "src"), **extra}


def help_seconds(checkout: Path, runs: int = 5) -> float:
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "health_mlops.cli", "--help"], check=True, capture_output=True,
                       env=environment(checkout))
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack += children.get(current, [])
    return found


def rss_mb(pid: int) -> tuple[str, float]:
    """(command, resident MB) of a process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "", 0.0
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return command, kb / 1024


def demo_memory(checkout: Path) -> tuple[float, list[tuple[str, float]]]:
    base = free_ports(20)
    ports = ["--port", str(base), "--ops-port", str(base + 1), "--node-api-port", str(base + 2),
             "--node-metrics-port", str(base + 8), "--dashboard-port", str(base + 14), "--prometheus-port",
             str(base + 15)]
    with tempfile.TemporaryDirectory(prefix="demo-memory-") as home:
        demo = subprocess.Popen([sys.executable, "-m", "health_mlops.cli", "demo", *ports],
                                env=environment(checkout, HEALTH_MLOPS_HOME=home), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline:
                if demo.poll() is not None:
                    raise SystemExit(f"{checkout}: the demo exited with {demo.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{base + 14}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            time.sleep(10)  # the dashboard's first page loads settle
            processes = [rss_mb(pid) for pid in descendants(demo.pid)]
        finally:
            demo.send_signal(signal.SIGINT)
            demo.wait(timeout=120)
    named = [(_name(command), mb) for command, mb in processes if command]
    return sum(mb for _, mb in named), sorted(named, key=lambda item: -item[1])


def _name(command: str) -> str:
    words = command.split()
    if "health_mlops.cli" in words:
        rest = words[words.index("health_mlops.cli") + 1:]
        if rest[:1] == ["node"]:
            return f"node {rest[rest.index('--node-id') + 1]}" if "--node-id" in rest else "node"
        return rest[0] if rest else "cli"
    return Path(words[0]).name


def main() -> None:
    checkouts = [Path(arg).resolve() for arg in sys.argv[1:]] or [Path(__file__).resolve().parents[1]]
    console = Console()
    results = {}
    for checkout in checkouts:
        console.print(f"measuring {checkout} ...")
        help_s = help_seconds(checkout)
        total, processes = demo_memory(checkout)
        results[checkout] = (help_s, total, processes)
    table = Table(title="`health-mlops --help` (median of 5) and `make demo`'s resident memory, dashboard up")
    table.add_column("checkout")
    table.add_column("--help", justify="right")
    table.add_column("demo RSS, all processes", justify="right")
    table.add_column("largest processes")
    for checkout, (help_s, total, processes) in results.items():
        table.add_row(str(checkout), f"{help_s:.2f} s", f"{total:,.0f} MB",
                      ", ".join(f"{name} {mb:.0f}" for name, mb in processes[:4]))
    console.print(table)
    if len(results) == 2:
        (help_a, total_a, _), (help_b, total_b, _) = results.values()
        console.print(f"second / first: --help {help_b / help_a:.2f}×, demo memory {total_b / total_a:.2f}×")


if __name__ == "__main__":
    main()
