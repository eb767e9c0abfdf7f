"""Fixtures the federation's process tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("federation") / "data"
    run_cli("data", "generate", "--out", str(root), "--hospitals", "3", "--rows-per-hospital", "1500", "--seed", "3",
            home=root.parent / "generate-home")
    return root
