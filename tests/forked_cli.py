"""`health-mlops` commands for the tests, each in a process of its own forked from a warm interpreter.

A command started with `python -m health_mlops.cli` spends 2 to 3 s of CPU importing torch (and, at its first
optimiser, torch._dynamo), pandas, scikit-learn and MLflow before it does anything; the suite runs about a hundred
commands, and on 2 CPUs shared by the test workers those imports were a fifth of the suite's time. Here one fork
server per test worker (`multiprocessing`'s forkserver, single-threaded) imports them once, and each command is a
child forked from it: a process of its own, with its own environment, standard output and error, exit code and
state, that only skips the imports. The process tests' aggregators and nodes (`start_forked`) are forked the same
way: the services they run, their ports, signals, logs and exit codes are a real process's. What a fresh
interpreter imports is tested apart (`test_the_cli_loads_no_heavy_library_before_a_command_runs`), and the demo,
whose services the browser and monitoring tests use, and Ctrl-C run as ordinary processes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from functools import cache
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext
from unittest import mock

from health_mlops.demo.processes import Child, Processes

# What the commands the tests run import, loaded once in the fork server.
PRELOAD = ["health_mlops.cli", "health_mlops.data.synthetic", "health_mlops.experiments.baselines",
           "health_mlops.experiments.loopback", "health_mlops.experiments.seeds", "health_mlops.fl.aggregator.service",
           "health_mlops.fl.node", "health_mlops.fl.privacy", "health_mlops.registry", "sklearn.linear_model",
           "torch._dynamo", "uvicorn"]
# The environment the server imports them in: what every command gets (rich reads the width when it is imported).
SERVER_ENVIRONMENT = {"COLUMNS": "160", "OMP_NUM_THREADS": "1"}

@cache
def _fork_server() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *PRELOAD])
    with mock.patch.dict(os.environ, SERVER_ENVIRONMENT):
        forkserver.ensure_running()
    return context


def _command(argv: list[str], environment: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """In the forked child: the console script, its output to the two files; its exit code is the child's."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        _redirect(fd, path)
    _main(argv, environment)


def _redirect(fd: int, path: str) -> None:
    file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(file, fd)
    os.close(file)


def _main(argv: list[str], environment: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environment)
    sys.argv = ["health-mlops", *argv]
    from health_mlops.cli import main

    try:
        main()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_forked(argv: list[str], environment: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`health-mlops *argv` in a forked process with exactly `environment`: as `subprocess.run(..., text=True,
    capture_output=True, timeout=timeout)` would answer (a command past its timeout is killed, and raises)."""
    command = ["health-mlops", *argv]
    with tempfile.TemporaryDirectory(prefix="forked-cli-") as folder:
        stdout_path, stderr_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        child = _fork_server().Process(target=_command, args=(argv, dict(environment), stdout_path, stderr_path))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout)
        with open(stdout_path, encoding="utf-8") as out, open(stderr_path, encoding="utf-8") as err:
            return subprocess.CompletedProcess(command, child.exitcode, out.read(), err.read())


def _service(argv: list[str], environment: dict[str, str], log_path: str) -> None:
    """In the forked child: a session of its own (as the demo starts its children) and its output to `log_path`."""
    os.setsid()
    _redirect(1, log_path)
    os.dup2(1, 2)
    _main(argv, environment)


class ForkedProcess:
    """A forked `health-mlops` command, answering as the `subprocess.Popen` of a child does (what `Processes` and
    the tests use of it): pid, poll, wait, signals and a negative return code for a signal's death."""

    def __init__(self, argv: list[str], process: multiprocessing.process.BaseProcess) -> None:
        self.args = ["health-mlops", *argv]
        self._process = process
        assert process.pid is not None  # started
        self.pid: int = process.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signal_number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal_number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_forked(argv: list[str], environment: Mapping[str, str], log_path: str) -> ForkedProcess:
    """`health-mlops *argv` (a service) forked in a session of its own with exactly `environment`, its standard
    output and error written to `log_path`."""
    # A daemon: were a test to leave it running, its worker stops it on the way out instead of waiting for it.
    child = _fork_server().Process(target=_service, args=(argv, dict(environment), log_path), daemon=True)
    child.start()
    return ForkedProcess(argv, child)


class ForkedProcesses(Processes):
    """The demo's `Processes`, whose `health-mlops` children are forked (`start_forked`) instead of started with a
    new interpreter."""

    def start(self, name: str, args: list[str], *, env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        process = start_forked(args, {**self.env, **(env or {})}, str(log_path))
        self.children[name] = Child(name, process, log_path, log)  # type: ignore[arg-type]
        return self.children[name]
