"""`health-mlops` commands for the tests, each in a process of its own forked from a warm interpreter.

A command started with `python -m health_mlops.cli` spends 2 to 3 s of CPU importing torch (and, at its first
optimiser, torch._dynamo), pandas, scikit-learn and MLflow before it does anything; the suite runs about a hundred
commands, and on 2 CPUs shared by the test workers those imports were a fifth of the suite's time. Here one fork
server per test worker (`multiprocessing`'s forkserver, single-threaded) imports them once, and each command is a
child forked from it: a process of its own, with its own environment, standard output and error, exit code and
state, that only skips the imports. What a fresh interpreter imports is tested apart
(`test_the_cli_loads_no_heavy_library_before_a_command_runs`), and the services, the demo and Ctrl-C run as
ordinary processes.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from functools import cache
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext
from unittest import mock

# What the commands the tests run import, loaded once in the fork server.
PRELOAD = ["health_mlops.cli", "health_mlops.data.synthetic", "health_mlops.experiments.baselines",
           "health_mlops.experiments.loopback", "health_mlops.experiments.seeds", "health_mlops.fl.privacy",
           "health_mlops.registry", "sklearn.linear_model", "torch._dynamo"]
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
    os.environ.clear()
    os.environ.update(environment)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file, fd)
        os.close(file)
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
