"""Fixtures the federation's process tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import made_once, run_cli


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 hospitals × 1500 patient-days (generator seed 3), generated once for the whole session: tests only read it
    (a test that changes a hospital's files changes a copy)."""
    def generate(folder: Path) -> None:
        run_cli("data", "generate", "--out", str(folder / "data"), "--hospitals", "3", "--rows-per-hospital", "1500",
                "--seed", "3", home=folder / "generate-home")

    return made_once(tmp_path_factory, "federation-data", generate) / "data"
