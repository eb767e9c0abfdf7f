"""The aggregation benchmark (benchmarks/aggregation.py) at a tiny size: its JSON output, as documented."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "aggregation.py"
KEYS = {"strategy", "hospitals", "params", "seconds", "bound_seconds", "peak_extra_bytes", "update_bytes"}


def test_one_size_prints_one_measurement_per_strategy_as_json(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--hospitals", "3", "--params", "1000", "--json",
                           "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=60, check=True)
    rows = json.loads(done.stdout)  # nothing else on stdout
    assert [r["strategy"] for r in rows] == ["fedavg", "fedyogi", "median", "trimmed_mean"]
    for row in rows:
        assert set(row) == KEYS
        assert (row["hospitals"], row["params"], row["update_bytes"]) == (3, 1000, 4000)
        assert row["seconds"] > 0 and row["bound_seconds"] > 0
        assert isinstance(row["peak_extra_bytes"], int) and row["peak_extra_bytes"] >= 0
    assert list(tmp_path.iterdir()) == []  # the update files are removed
