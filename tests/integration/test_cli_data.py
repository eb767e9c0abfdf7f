"""`health-mlops data ...` as a user runs it: a real process, real files, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, run_cli_json
from tests.unit.test_validate import CORRUPTIONS, REPEATED_HEADER_LINE, SHORT_LINE, write_corrupted_csv

pytestmark = pytest.mark.process

# The corrupted file's valid rows are few, all without an event.
ONE_CLASS = ("every valid row has adverse_event_7d = 0: a model of its own learns one answer, and an AUC on its rows "
             "is undefined")


def test_generate_prints_how_hospitals_differ(tmp_path: Path, home: Path) -> None:
    result = run_cli("data", "generate", "--out", str(tmp_path / "d"), "--rows-per-hospital", "300", "--seed", "7",
                     home=home)
    for column in ("events", "age", "PM2.5", "temp", "Bayes AUC", "Riverton", "Baymouth"):
        assert column in result.stdout
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "hospital-1", "hospital-2", "hospital-3", "hospital-4", "hospital-5", "reference.json", "spec.yaml"]


def test_generate_takes_one_size_per_hospital_and_by_default_a_realistic_consortium(tmp_path: Path,
                                                                                   home: Path) -> None:
    listed = run_cli_json("data", "generate", "--out", str(tmp_path / "a"), "--rows-per-hospital", "300,120",
                          home=home)
    assert [(s["hospital_id"], s["rows"]) for s in listed] == [("hospital-1", 300), ("hospital-2", 120)]
    cycled = run_cli_json("data", "generate", "--out", str(tmp_path / "b"), "--hospitals", "6", home=home)
    assert [s["rows"] for s in cycled] == [12000, 6000, 2500, 800, 300, 12000]
    for args, named in ((["--hospitals", "3", "--rows-per-hospital", "300,120"],
                         "--hospitals: 3, but --rows-per-hospital lists 2 hospitals"),
                        (["--rows-per-hospital", "300,many"], "--rows-per-hospital: '300,many' is not a number"),
                        (["--rows-per-hospital", "300,5"], "--rows-per-hospital: at least 10 patient-days")):
        answer = run_cli("data", "generate", "--out", str(tmp_path / "c"), *args, home=home, check=False)
        assert answer.returncode == 2 and named in answer.stderr, (args, answer.stderr)


def test_validate_reports_and_writes_the_quarantine(tmp_path: Path, home: Path) -> None:
    folder = tmp_path / "hospital-9"
    folder.mkdir()
    write_corrupted_csv(folder / "export.csv")
    validated = run_cli("data", "validate", str(folder), "--json", home=home, check=False)
    report = json.loads(validated.stdout)
    (file_report,) = report["files"]
    assert [q["line"] for q in file_report["quarantined"]] == sorted({*CORRUPTIONS, REPEATED_HEADER_LINE, SHORT_LINE})
    # 5 valid rows of one outcome: one class, a test split of 1 row, too few training rows to validate on
    size = ["its 1 test rows all have adverse_event_7d = 0: too few to test on; its AUC is undefined (null)",
            "4 training rows are too few to hold out 10 validation rows: it trains on all of them, without early "
            "stopping, and its rows take no part in choosing the federation's round"]
    assert report["hospitals"] == {"hospital-9": {"rows_valid": file_report["rows_valid"],
                                                  "rows_quarantined": file_report["rows_quarantined"],
                                                  "missing_values": {}, "excluded": None,
                                                  "warnings": [ONE_CLASS, *size]}}
    assert report["exit_code"] == validated.returncode == 1  # usable, with a warning
    quarantine = Path(report["report_dir"]) / "hospital-9" / "export.csv.quarantine.csv"
    assert quarantine.is_file()
    human = run_cli("data", "validate", str(folder), home=home, check=False)
    assert "line 4: age: 150 is out of range (allowed 18 to 110 years)" in human.stdout
    assert human.returncode == 1 and f"hospital-9: warning: {ONE_CLASS}" in human.stderr


def _missing_path(folder: Path) -> Path:
    return folder / "nowhere"


def _corrupt_parquet(folder: Path) -> Path:
    (folder / "data.parquet").write_bytes(b"PAR1 truncated")
    return folder


def _missing_columns(folder: Path) -> Path:
    (folder / "few.csv").write_text("heart_rate,spo2\n70,97\n")
    return folder / "few.csv"


def _empty(folder: Path) -> Path:
    (folder / "empty.csv").write_bytes(b"")
    return folder / "empty.csv"


def _latin1(folder: Path) -> Path:
    (folder / "latin1.csv").write_bytes("température\n37,5\n".encode("latin-1"))
    return folder / "latin1.csv"


@pytest.mark.parametrize(("make", "message"), [
    (_missing_path, "no such file or folder"),
    (_corrupt_parquet, "cannot read as Parquet"),
    (_missing_columns, "missing required column(s): body_temperature"),
    (_empty, "empty file"),
    (_latin1, "wrong encoding: not UTF-8"),
])
def test_unusable_input_exits_2_naming_the_file(tmp_path: Path, home: Path, make, message: str) -> None:
    target = make(tmp_path)
    result = run_cli("data", "validate", str(target), home=home, check=False)
    assert result.returncode == 2, result.stderr
    stderr = result.stderr.replace("\n", "")
    assert message in stderr
    assert str(target) in stderr
    assert "Traceback" not in stderr


def test_the_cli_says_its_version(home: Path) -> None:
    from importlib.metadata import version

    answer = run_cli("--version", home=home)
    assert answer.stdout.strip() == f"health-mlops {version('health-mlops')}"


def test_help_piped_into_a_file_keeps_its_choices_whole() -> None:
    """Piped (no terminal, no COLUMNS), help is as wide as the tables, not rich's 80 columns that cut
    [pooled|local|federated] in two."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    helped = subprocess.run([sys.executable, "-m", "health_mlops.cli", "train", "--help"], capture_output=True,
                            text=True, check=True, env=env).stdout
    assert "[pooled|local|federated]" in helped
    assert max(len(line) for line in helped.splitlines()) > 80


def test_the_cli_loads_no_heavy_library_before_a_command_runs() -> None:
    """`--help`, `--version` and a mistyped option answer at once: what a command needs (torch, pandas, MLflow,
    Gradio, ...) is imported by that command."""
    heavy = ("torch", "pandas", "numpy", "scipy", "sklearn", "mlflow", "gradio", "onnxruntime", "httpx", "fastapi")
    code = f"import sys, health_mlops.cli; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == ""


@pytest.mark.parametrize(("service", "absent"), [
    ("health_mlops.fl.aggregator.server", ("torch", "opacus", "health_mlops.ml.model", "health_mlops.fl.hospital")),
    ("health_mlops.serving.app", ("torch", "health_mlops.fl.coordinator"))])
def test_a_service_loads_only_what_it_runs(service: str, absent: tuple[str, ...]) -> None:
    """The aggregator averages arrays and starts runs from numpy draws (`ml.initial_weights`): an image of it needs
    no torch. The dashboard reads run views and serves ONNX: it loads neither torch nor the coordinator."""
    code = f"import sys, {service}; print(','.join(m for m in {absent!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {service} loaded {loaded}"
