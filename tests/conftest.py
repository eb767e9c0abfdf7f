"""Shared helpers: running the real `health-mlops` command in a subprocess with its own state folder, ports and
folders that stay apart when pytest-xdist runs the suite in several worker processes at once."""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.forked_cli import run_forked

# The workers are the suite's parallelism: each trains on one thread (as the services do, `torch_threads`). Torch's
# default, a thread per core, doubles the CPU time of a small model's training in the tests that train in-process,
# and makes the workers fight over the cores. Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A suite started from a background job (`cmd &` in a script, nohup) inherits SIGINT ignored, and so would every
# process a test starts: the tests that press Ctrl-C on the demo would wait for a stop that never comes. A handler
# (not SIG_IGN) is reset to the default at exec, so the processes the tests start take Ctrl-C as a user's would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_cli(*args: str, home: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`health-mlops *args` in a process of its own with `home` as its state folder (forked from a warm
    interpreter: `tests.forked_cli`)."""
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(home), "COLUMNS": "160"}
    result = run_forked(list(args), env, timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"health-mlops {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


def run_cli_json(*args: str, home: Path, timeout: float = 300) -> object:
    return json.loads(run_cli(*args, "--json", home=home, timeout=timeout).stdout)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow database with MLflow's schema and nothing in it, made once: MLflow's first open of a new sqlite file
    runs its alembic migrations, a second of CPU that every test with a registry of its own would pay again."""
    def migrate(folder: Path) -> None:
        from mlflow import MlflowClient

        uri = f"sqlite:///{folder / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments()
        client.search_registered_models()

    return made_once(tmp_path_factory, "mlflow-db", migrate) / "mlflow.db"


def with_empty_mlflow_db(home: Path, empty_db: Path) -> Path:
    """`home`, with a copy of the empty MLflow database where its registry opens it (`default_tracking_uri`)."""
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_db, home / "mlflow" / "mlflow.db")
    return home


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder `make` fills once per test session, by whichever xdist worker asks first, while the others wait for
    it; every caller only reads it. For what takes seconds to make and is the same for every test that uses it."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # each worker has its own folder under the session's
        root = root.parent
    folder = root / "made-once" / name
    folder.parent.mkdir(exist_ok=True)
    # flock on a lock file that is never removed: a lock file removed on release would let a third caller lock a
    # new file while a second still holds the old one.
    with open(f"{folder}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (folder.parent / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a make that failed half-way
            folder.mkdir()
            make(folder)
            (folder.parent / f"{name}.done").touch()
    return folder


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections (Linux: 32768-60999 unless configured)."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def worker_ports() -> tuple[int, int]:
    """The ports this test worker may use, [low, high): those from 10000 to the ephemeral range (where a port can be
    taken by any outgoing connection, a scrape or a poll, between our check and the bind), split evenly between
    pytest-xdist's workers, so that two workers never start services on the same port."""
    low, high = 10000, ephemeral_port_range()[0]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    width = (high - low) // workers
    return low + worker * width, low + (worker + 1) * width


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports of this worker's that are free on 127.0.0.1 right now."""
    low, high = worker_ports()
    for _ in range(200):
        base = random.randint(low, high - count)
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
