"""`scripts/install-torch.sh` takes torch from the first source that has it: a local wheel, else PyTorch's CPU
index, else PyPI with a notice of the download. Real pip in a real venv, each index a real HTTP server on
loopback serving a small stand-in torch wheel that says where it came from."""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# One virtual environment for the module (`venv`): its tests run on one xdist worker.
pytestmark = [pytest.mark.process, pytest.mark.xdist_group("install-torch")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install-torch.sh"
VERSION = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]


def stand_in_wheel(folder: Path, source: str, local_version: str = "") -> Path:
    """A pure-Python wheel named torch at pyproject's pin whose `torch.SOURCE` is `source`."""
    version = VERSION + local_version
    dist_info = f"torch-{version}.dist-info"
    files = {"torch/__init__.py": f"SOURCE = {source!r}\n",
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()}"
              f",{len(text.encode())}" for name, text in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,", ""])
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture
def serve_index() -> Iterator:
    """Serves a folder over HTTP on loopback; its directory listings are what pip reads as a simple index."""
    servers: list[ThreadingHTTPServer] = []

    def serve(folder: Path) -> str:
        handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=300)
    return folder / "bin" / "python"


def install(python: Path, *, find_links: Path | None, cpu_index: str, pypi: str) -> str:
    """Runs the script with pip seeing only the given sources (no pip.conf); returns what torch it installed
    and the script's output."""
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "torch"], timeout=300)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(find_links or ""),
           "PIP_INDEX_URL": f"{pypi}/", "TORCH_CPU_INDEX": cpu_index, "PIP_NO_INPUT": "1"}
    run = subprocess.run(["bash", str(SCRIPT), str(python)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    installed = subprocess.run([str(python), "-c", "import torch; print(torch.SOURCE)"], capture_output=True,
                               text=True, timeout=60)
    return installed.stdout.strip() + " | " + run.stdout.strip()


def test_a_local_wheel_wins_and_nothing_is_downloaded(venv: Path, tmp_path: Path, serve_index) -> None:
    local = stand_in_wheel(tmp_path / "wheels", "local", "+cpu").parent
    cpu = serve_index(stand_in_wheel(tmp_path / "cpu" / "torch", "cpu-index", "+cpu").parent.parent)
    pypi = serve_index(stand_in_wheel(tmp_path / "pypi" / "torch", "pypi").parent.parent)
    assert install(venv, find_links=local, cpu_index=cpu, pypi=pypi) == \
        f"local | torch {VERSION}: installed from a local wheel"


def test_without_a_local_wheel_the_cpu_index_is_next(venv: Path, tmp_path: Path, serve_index) -> None:
    cpu = serve_index(stand_in_wheel(tmp_path / "cpu" / "torch", "cpu-index", "+cpu").parent.parent)
    pypi = serve_index(stand_in_wheel(tmp_path / "pypi" / "torch", "pypi").parent.parent)
    outcome = install(venv, find_links=tmp_path / "empty", cpu_index=cpu, pypi=pypi)
    assert outcome == f"cpu-index | torch {VERSION}: installing the CPU build from {cpu} (about 190 MB)"


def test_pypi_comes_last_with_a_notice_of_the_download(venv: Path, tmp_path: Path, serve_index) -> None:
    pypi = serve_index(stand_in_wheel(tmp_path / "pypi" / "torch", "pypi").parent.parent)
    unreachable = closed_port_url()
    outcome = install(venv, find_links=None, cpu_index=unreachable, pypi=pypi)
    assert outcome == (f"pypi | torch {VERSION}: no local wheel and {unreachable} unreachable: installing from "
                       "PyPI, the CUDA build on x86_64 (2.7 GB to download)")


def test_an_installed_torch_at_the_pin_is_kept(venv: Path, tmp_path: Path, serve_index) -> None:
    pypi = serve_index(stand_in_wheel(tmp_path / "pypi" / "torch", "pypi").parent.parent)
    install(venv, find_links=None, cpu_index=closed_port_url(), pypi=pypi)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_INDEX_URL": closed_port_url() + "/"}
    again = subprocess.run(["bash", str(SCRIPT), str(venv)], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr
