"""Shared helpers: running the real `health-mlops` command in a subprocess with its own state folder."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, home: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(home), "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "health_mlops.cli", *args], capture_output=True, text=True,
                            env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"health-mlops {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def run_cli_json(*args: str, home: Path) -> object:
    return json.loads(run_cli(*args, "--json", home=home).stdout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (Linux: 32768-60999 unless configured)."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports that are free on 127.0.0.1 right now, below the ephemeral range: a
    port in it can be taken by any outgoing connection (a scrape, a poll) between this check and the bind."""
    top = ephemeral_port_range()[0] - count
    for _ in range(200):
        base = random.randint(min(10000, top - 1000), top)
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range found")


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Wait for `url` to answer 200 while `process` (which should serve it) is alive."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, f"the process serving {url} exited: {process.communicate()}"
        assert time.monotonic() < deadline, f"{url} was not ready after {timeout_s:.0f} s"
        time.sleep(0.1)
