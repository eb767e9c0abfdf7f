"""The demo's child processes: each a command in its own session with its output in a log file, stopped in
order on the way out (Ctrl-C included); and waiting until one is ready."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from health_mlops.errors import DemoError

# Generous: a process imports torch, Gradio or MLflow first, which takes long on a busy 2-CPU machine; a process
# that exits is reported at once.
READY_TIMEOUT_S = 180.0


def check_ports_free(ports: list[int]) -> None:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise DemoError(f"port {port} on 127.0.0.1 is in use; choose other ports (see --help)") from None


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def log_tail(self, lines: int = 15) -> str:
        self.log.flush()
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Processes:
    """Child processes of the demo, each in its own session (so Ctrl-C reaches the demo, which stops them in
    order) with its output in a log file."""

    log_dir: Path
    env: dict[str, str]
    children: dict[str, Child] = field(default_factory=dict)

    def start(self, name: str, args: list[str], *, env: Mapping[str, str] | None = None) -> Child:
        """`health-mlops <args>` as a child (with `env` added to the environment)."""
        return self.start_program(name, [sys.executable, "-m", "health_mlops.cli", *args], env=env)

    def start_program(self, name: str, command: list[str], *, env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                       start_new_session=True)
        except OSError:
            log.close()
            raise
        self.children[name] = Child(name, process, log_path, log)
        return self.children[name]

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child, SIGKILL what is left after `grace_s`; a second Ctrl-C only hastens the kill."""
        try:
            for child in self.children.values():
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in self.children.values():
                try:
                    child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for child in self.children.values():
                if child.process.poll() is None:
                    child.process.kill()
                    child.process.wait()
                child.log.close()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()


def wait_ready(url: str, child: Child, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise DemoError(f"{child.name} exited with code {child.process.returncode}; the end of "
                            f"{child.log_path}:\n{child.log_tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise DemoError(f"{child.name} was not ready at {url} after {timeout_s:.0f} s; see {child.log_path}")
