"""`health-mlops train` and `demo` end to end, including the Core acceptance numbers."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import free_port_range, run_cli, run_cli_json


def test_train_json_has_the_documented_shape(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "800", home=home)
    for mode in ("pooled", "local"):
        result = run_cli_json("train", "--data", str(data), "--mode", mode, "--epochs", "2", home=home)
        assert result["mode"] == mode
        assert result["task"] == "binary" and result["metric"] == "auc"
        assert set(result["overall"]) == {"auc", "accuracy", "brier", "log_loss"}
        assert list(result["per_hospital"]) == ["hospital-1", "hospital-2", "hospital-3"]
        assert set(result["reference"]) == {"overall", "per_hospital"}
        assert 0.5 < result["overall"]["auc"] <= 1


def test_core_acceptance_pooled_near_bayes_and_collaboration_pays(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "acceptance"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "5", "--rows-per-hospital", "4000",
            "--seed", "7", home=home)
    pooled = run_cli_json("train", "--data", str(data), "--mode", "pooled", home=home)
    local = run_cli_json("train", "--data", str(data), "--mode", "local", home=home)
    bayes = pooled["reference"]["overall"]["auc"]
    assert pooled["overall"]["auc"] >= bayes - 0.02
    wins = [h for h in pooled["per_hospital"] if pooled["per_hospital"][h]["auc"] > local["per_hospital"][h]["auc"]]
    assert len(wins) >= 3, (pooled["per_hospital"], local["per_hospital"])


def test_diabetes_runs_pooled_and_local_with_r2(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "diabetes"
    run_cli("data", "generate", "--spec", "diabetes", "--out", str(data), home=home)
    for mode in ("pooled", "local"):
        result = run_cli_json("train", "--data", str(data), "--mode", mode, home=home)
        assert result["task"] == "regression" and result["metric"] == "r2"
        assert len(result["per_hospital"]) == 5
        assert 0.3 < result["overall"]["r2"] < 0.8  # the data set's well-known linear fit explains about half
        assert "reference" not in result


def test_demo_runs_the_federation_as_processes_and_prints_the_table(home: Path) -> None:
    base = free_port_range(13)
    ports = ["--port", str(base), "--node-api-port", str(base + 1), "--node-metrics-port", str(base + 7)]
    result = run_cli("demo", "--rows-per-hospital", "600", "--rounds", "3", "--no-serve", *ports, home=home)
    for text in ("federated", "pooled", "local-only", "Bayes-optimal", "hospital-5", "overall"):
        assert text in result.stdout
    assert (home / "credentials" / "hospital-5.token").is_file()
    logs = sorted(p.name for p in (home / "logs").iterdir())
    assert logs == ["aggregator.log", "hospital-1-a.log", "hospital-1-b.log", "hospital-2-a.log",
                    "hospital-3-a.log", "hospital-4-a.log", "hospital-5-a.log"]
