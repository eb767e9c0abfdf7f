"""`health-mlops train` and `demo` end to end, including the Core acceptance numbers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from health_mlops.config import TrainingDefaults

from tests.conftest import free_port_range, run_cli, run_cli_json, wait_until_ready

pytestmark = pytest.mark.process


def test_train_json_has_the_documented_shape(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "800", home=home)
    for mode in ("pooled", "local"):
        result = run_cli_json("train", "--data", str(data), "--mode", mode, "--epochs", "2", home=home)
        assert result["mode"] == mode
        assert result["task"] == "binary" and result["metric"] == "auc"
        metrics = {"auc", "auc_ci", "brier", "log_loss", "accuracy", "sensitivity", "specificity", "ppv", "npv",
                   "balanced_accuracy", "calibration_slope", "calibration_intercept"}
        assert set(result["overall"]) == set(result["mean_over_hospitals"]) == metrics
        assert list(result["per_hospital"]) == ["hospital-1", "hospital-2", "hospital-3"]
        for hospital in result["per_hospital"].values():
            assert set(hospital) == metrics | {"undefined"}
            low, high = hospital["auc_ci"] or (None, None)
            assert hospital["auc"] is None or low is None or low <= hospital["auc"] <= high
            assert all(hospital[name] is None for name in hospital["undefined"])  # each null says why
        assert set(result["reference"]) == {"overall", "per_hospital", "mean_over_hospitals"}
        assert 0 < (result["threshold"] if mode == "pooled" else result["threshold"]["hospital-1"]) < 0.2
        assert 0.5 < result["overall"]["auc"] <= 1


def test_train_takes_a_seed_and_a_failed_json_run_prints_a_json_error(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "2", "--rows-per-hospital", "400", home=home)

    def auc(seed: int) -> float:
        result = run_cli_json("train", "--data", str(data), "--mode", "pooled", "--epochs", "2", "--seed", str(seed),
                              home=home)
        return result["overall"]["auc"]  # type: ignore[index]

    first = auc(1)
    assert auc(1) == first and auc(2) != first  # the seed decides the model, and only the seed
    missing = run_cli("train", "--data", str(tmp_path / "absent"), "--mode", "pooled", "--json", home=home,
                      check=False)
    assert missing.returncode == 2
    error = strict_json(missing.stdout)
    assert error["exit_code"] == 2 and "absent" in error["error"] and error["reason"].startswith("unusable input")
    refused = run_cli("train", "--data", str(data), "--mode", "pooled", "--dp-epsilon", "3", "--json", home=home,
                      check=False)
    assert refused.returncode == 2 and "--dp-epsilon" in strict_json(refused.stdout)["error"]


def strict_json(text: str) -> dict:
    """JSON as a strict parser reads it: a bare NaN or Infinity is an error."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_hospital_without_valid_rows_is_named_by_validate_and_left_out_of_every_mode(tmp_path: Path,
                                                                                       home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "400", home=home)
    path = data / "hospital-3" / "patient_days.csv"
    frame = pd.read_csv(path)
    frame["spo2"] = 0  # "not measured" recorded as 0: out of range, every row quarantined
    frame.to_csv(path, index=False)
    reason = f"no valid rows: all {len(frame)} rows invalid (quarantined)"

    validated = run_cli("data", "validate", str(data), home=home, check=False)
    assert validated.returncode == 1 and f"hospital-3: left out of training: {reason}" in validated.stderr
    assert run_cli("data", "validate", str(data), "--strict", home=home, check=False).returncode == 2
    report = strict_json(run_cli("data", "validate", str(data), "--json", home=home, check=False).stdout)
    assert report["exit_code"] == 1 and report["hospitals"]["hospital-3"]["excluded"] == reason
    assert report["hospitals"]["hospital-1"]["excluded"] is None

    for mode, options in (("pooled", ["--epochs", "2"]), ("local", ["--epochs", "2"]),
                          ("federated", ["--rounds", "2"])):
        trained = run_cli("train", "--data", str(data), "--mode", mode, *options, "--json", home=home)
        result = strict_json(trained.stdout)
        assert list(result["per_hospital"]) == ["hospital-1", "hospital-2"], mode
        assert result["excluded"] == {"hospital-3": reason}, mode
        assert "hospital-3: left out of training" in trained.stderr and "Traceback" not in trained.stderr, mode
    assert list(result["run"]["excluded"]) == ["hospital-3"]  # the federation left it out in round 0 too


def test_a_hospital_that_writes_not_measured_as_0_trains_in_every_mode_with_federated_imputation(
        tmp_path: Path, home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "400", home=home)
    spec = yaml.safe_load((data / "spec.yaml").read_text())
    spo2 = next(f for f in spec["features"] if f["name"] == "spo2")
    spo2["missing"] = {"codes": [0, -9], "impute": "mean", "indicator": True}
    (data / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    path = data / "hospital-2" / "patient_days.csv"
    frame = pd.read_csv(path)
    frame.loc[::3, "spo2"] = 0  # this hospital's lab export writes "not measured" as 0 (and once as -9)
    frame.loc[1, "spo2"] = -9
    frame.loc[2, "spo2"] = 20  # a real out-of-range value is still invalid
    frame.to_csv(path, index=False)
    not_measured = len(frame.loc[::3]) + 1
    rare = data / "hospital-3" / "patient_days.csv"  # 2 current smokers: a category round 0 withholds
    pd.read_csv(rare).assign(smoker=lambda f: ["current" if i < 2 else "never" for i in range(len(f))]).to_csv(
        rare, index=False)

    report = strict_json(run_cli("data", "validate", str(data), "--json", home=home, check=False).stdout)
    said = [w for h in report["hospitals"].values() for w in h["warnings"]]
    assert not any("spo2" in w for w in said)  # values "not measured" are counted, not warned about
    assert all("training rows" in w for w in said)  # 320 training rows, few events: only what size limits
    assert report["exit_code"] == (1 if said else 0)
    assert report["hospitals"]["hospital-2"]["missing_values"] == {"spo2": not_measured}
    assert report["hospitals"]["hospital-2"]["rows_quarantined"] == 1
    assert report["hospitals"]["hospital-1"]["missing_values"] == {}

    imputed = {}
    for mode, options in (("pooled", ["--epochs", "10"]), ("local", ["--epochs", "2"]),
                          ("federated", ["--rounds", "2"])):
        trained = run_cli("train", "--data", str(data), "--mode", mode, *options, "--json", home=home)
        result = strict_json(trained.stdout)
        assert list(result["per_hospital"]) == ["hospital-1", "hospital-2", "hospital-3"], mode
        assert result["excluded"] == {} and isinstance(result["per_hospital"]["hospital-2"]["auc"], float), mode
        imputed[mode] = result["imputation"]
        if mode == "pooled":  # trained long enough to rank: the filled-in rows still score
            assert result["per_hospital"]["hospital-2"]["auc"] > 0.8
    # The small category did not vanish without a word.
    assert "hospital-3: warning: round 0 withheld 1 column(s)" in trained.stderr
    assert any("withheld 1 column(s)" in w for w in result["warnings"]["hospital-3"])
    # The federation's fill-in comes from the hospitals' round-0 counts and sums of the values they measured; it
    # is exactly the pooled rows' mean of measured values, which a 0 taken at face value would pull far down.
    measured = pd.concat(pd.read_csv(data / h / "patient_days.csv")["spo2"] for h in ("hospital-1", "hospital-3"))
    assert imputed["federated"]["spo2"] == pytest.approx(imputed["pooled"]["spo2"], rel=1e-9)
    assert abs(imputed["federated"]["spo2"] - measured.mean()) < 0.5
    assert set(imputed["local"]) == {"hospital-1", "hospital-2", "hospital-3"}


def test_every_training_knob_reaches_the_run_and_the_specs_epochs_are_spread_over_the_rounds(tmp_path: Path,
                                                                                             home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "2", "--rows-per-hospital", "300", home=home)
    result = run_cli_json("train", "--data", str(data), "--mode", "federated", "--rounds", "1", "--epochs", "2",
                          "--strategy", "fedprox", "--proximal-mu", "0.25", "--weight-decay", "0.02",
                          "--learning-rate", "0.005", "--batch-size", "16", "--model", "mlp", "--hidden", "8,4",
                          home=home)
    config = result["run"]["config"]
    assert (config["local_epochs"], config["weight_decay"], config["learning_rate"], config["batch_size"]) == (
        2, 0.02, 0.005, 16)
    assert config["strategy"]["name"] == "fedprox" and config["strategy"]["proximal_mu"] == 0.25
    assert result["model"] == {"kind": "mlp", "hidden": [8, 4]}
    yogi = run_cli_json("train", "--data", str(data), "--mode", "federated", "--rounds", "1", "--strategy", "fedyogi",
                        "--server-learning-rate", "0.05", "--local-steps", "3", "--batch-size", "8", home=home)
    assert yogi["run"]["config"]["strategy"]["server"]["learning_rate"] == 0.05
    assert yogi["run"]["config"]["local_steps"] == 3  # 3 batches of 8 rows, of 240 training rows
    assert run_cli_json("train", "--data", str(data), "--mode", "pooled", "--epochs", "1", "--model", "linear",
                        home=home)["model"]["kind"] == "linear"
    for refused, option in ((["--mode", "federated", "--proximal-mu", "0.1"], "--proximal-mu"),  # fedavg has none
                            (["--mode", "pooled", "--trim-fraction", "0.1"], "--trim-fraction"),
                            (["--mode", "pooled", "--hidden", "8,x"], "--hidden"),
                            (["--mode", "pooled", "--local-steps", "5"], "--local-steps")):
        answer = run_cli("train", "--data", str(data), *refused, home=home, check=False)
        assert answer.returncode == 2 and f"error: {option}" in answer.stderr, refused

    diabetes = tmp_path / "diabetes"
    run_cli("data", "generate", "--spec", "diabetes", "--out", str(diabetes), home=home)
    stepped = run_cli_json("train", "--data", str(diabetes), "--mode", "federated", "--rounds", "2", home=home)
    assert stepped["run"]["config"]["local_steps"] == TrainingDefaults().local_steps  # a budget in steps
    assert stepped["run"]["config"]["validation_fraction"] == TrainingDefaults().validation_fraction
    with (diabetes / "spec.yaml").open("a", encoding="utf-8") as spec:  # a spec that asks for 200 epochs
        spec.write("training:\n  epochs: 200\n")
    spread = run_cli_json("train", "--data", str(diabetes), "--mode", "federated", "--rounds", "8", home=home)
    assert spread["run"]["config"]["local_epochs"] == 25 and spread["run"]["config"]["local_steps"] is None


def test_train_federated_adds_the_timing_of_its_rounds(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "800", home=home)
    result = run_cli_json("train", "--data", str(data), "--mode", "federated", "--rounds", "3", home=home)
    assert result["mode"] == "federated" and result["metric"] == "auc"
    assert list(result["per_hospital"]) == ["hospital-1", "hospital-2", "hospital-3"]
    assert set(result["timing"]) == {"rounds", "wall_seconds", "round_overhead_ms_median"}
    assert result["timing"]["rounds"] == 3
    assert 0 < result["timing"]["round_overhead_ms_median"] < 1000 * result["timing"]["wall_seconds"]
    assert result["run"]["config"]["rounds"] == 3 and result["run"]["rejected"] == {}
    assert 0.5 < result["overall"]["auc"] <= 1


def test_train_federated_with_differential_privacy_reports_what_each_hospital_spent(tmp_path: Path,
                                                                                   home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "3", "--rows-per-hospital", "800", home=home)
    result = run_cli_json("train", "--data", str(data), "--mode", "federated", "--rounds", "3", "--dp-epsilon", "3",
                          home=home)
    privacy = result["privacy"]
    assert privacy["delta"] == 1e-5 and privacy["budget_epsilon"] == 3
    assert sorted(privacy["hospitals"]) == ["hospital-1", "hospital-2", "hospital-3"]
    assert privacy["epsilon"] == max(privacy["hospitals"].values())
    assert all(2.5 < eps <= 3.01 for eps in privacy["hospitals"].values())  # the budget spent, never more
    assert result["run"]["config"]["privacy"]["epsilon"] == 3
    # What DP-SGD trained with is stated, never silently different from a run without a budget
    defaults = TrainingDefaults()
    assert privacy["learning_rate"] == defaults.dp_learning_rate
    assert privacy["sampling_rate"] == defaults.dp_sampling_rate
    batch = round(defaults.dp_sampling_rate * 640)  # of each hospital's 640 training rows
    assert privacy["batch_size"] == dict.fromkeys(privacy["hospitals"], batch)
    assert sorted(privacy["noise_multiplier"]) == sorted(privacy["hospitals"])
    assert all(0 < noise <= 10 for noise in privacy["noise_multiplier"].values())
    shown = run_cli("train", "--data", str(data), "--mode", "federated", "--rounds", "1", "--dp-epsilon", "3",
                    home=home).stdout
    assert (f"learning rate {defaults.dp_learning_rate:g}, each hospital's batch {defaults.dp_sampling_rate:g} of its "
            "training rows") in shown
    assert re.search(rf"noise multiplier per hospital: hospital-1 [\d.]+ \(batch {batch}\)", shown)
    assert sorted(result["run"]["suppressed"]) == ["hospital-1", "hospital-2", "hospital-3"]
    # Scored, but not bounded: DP-SGD's noise is not seeded, and on 3 × 800 rows over 3 rounds at ε = 3 the AUC
    # ranged 0.47-0.73 (13 runs). What privacy costs in AUC is the privacy acceptance's claim, over seeds.
    assert result["overall"]["auc"] is not None
    plain = run_cli_json("train", "--data", str(data), "--mode", "federated", "--rounds", "1", home=home)
    assert plain["privacy"] is None


def test_a_privacy_budget_or_option_that_cannot_be_used_is_refused_naming_it(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "d"
    run_cli("data", "generate", "--out", str(data), "--hospitals", "2", "--rows-per-hospital", "400", home=home)
    federated = ("train", "--data", str(data), "--mode", "federated", "--rounds", "2")
    refused = run_cli(*federated, "--dp-epsilon", "0.05", home=home, check=False)
    assert refused.returncode == 1, refused.stderr
    assert "privacy budget refused at 2 of 2 hospitals" in refused.stderr and "Traceback" not in refused.stderr
    assert "at hospital-1: " in refused.stderr and "at hospital-2: " in refused.stderr
    for options, named in [(("--dp-noise-multiplier", "2"), "--dp-noise-multiplier needs --dp-epsilon"),
                           (("--dp-epsilon", "2", "--dp-delta", "0.5"), "--dp-delta"),
                           (("--dp-epsilon", "-1"), "--dp-epsilon"),
                           (("--dp-epsilon", "2", "--strategy", "fedprox"), "FedProx")]:
        result = run_cli(*federated, *options, home=home, check=False)
        assert result.returncode == 2 and named in result.stderr, (options, result.stderr)
    pooled = run_cli("train", "--data", str(data), "--mode", "pooled", "--dp-epsilon", "2", home=home, check=False)
    assert pooled.returncode == 2 and "--mode federated" in pooled.stderr


@pytest.fixture(scope="module")
def over_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The realistic consortium (12000, 6000, 2500, 800 and 300 patient-days) of generator seeds 1 to 5, each with its
    own split and its independent cohort, trained pooled, local-only and federated (`health-mlops evaluate`). Exit
    code 1 (a claim failed) still gives the document, which the tests below read."""
    home = tmp_path_factory.mktemp("over-seeds") / "home"
    # 2 minutes alone on 2 CPUs (15 trainings of 4000 steps, 5 federations of 20 rounds x 200 steps a hospital);
    # the guard is far beyond, for a machine the other tests share.
    answer = run_cli("evaluate", "--seeds", "1-5", "--json", home=home, timeout=1200, check=False)
    assert answer.returncode in (0, 1), answer.stderr
    return json.loads(answer.stdout)


@pytest.mark.xdist_group("over-seeds")  # one `over_seeds` for all; a group is scheduled first
def test_core_acceptance_pooled_near_bayes_and_collaboration_pays(over_seeds: dict) -> None:
    cohort = over_seeds["cohort"]
    pooled, bayes = (cohort[mode]["mean_over_hospitals"]["auc"] for mode in ("pooled", "Bayes-optimal"))
    assert pooled >= bayes - 0.02, (pooled, bayes)
    wins = [h for h in cohort["rows_per_hospital"]
            if cohort["pooled"]["per_hospital"][h]["auc"] > cohort["local-only"]["per_hospital"][h]["auc"]]
    assert len(wins) >= 3, cohort
    assert cohort["rows_per_hospital"] == {"hospital-1": 12000, "hospital-2": 6000, "hospital-3": 2500,
                                           "hospital-4": 800, "hospital-5": 300}


@pytest.mark.xdist_group("over-seeds")  # one `over_seeds` for all; a group is scheduled first
def test_federation_acceptance_over_seeds_close_to_pooled_and_no_hospital_worse_off(over_seeds: dict) -> None:
    """On each hospital's independent cohort, mean over seeds: the federation within 0.005 of pooled training,
    nowhere below local-only beyond the interval, above it beyond the interval where a hospital is too small to
    train alone (800 and 300 patient-days), and no model above the Bayes-optimal risk beyond the interval."""
    cohort = over_seeds["cohort"]
    federated, pooled = (cohort[mode]["mean_over_hospitals"]["auc"] for mode in ("federated", "pooled"))
    assert federated >= pooled - 0.005, (federated, pooled)
    versus_local = cohort["differences"]["federated - local-only"]
    assert all(change["high"] >= 0 for change in versus_local.values()), versus_local
    assert versus_local["hospital-4"]["low"] > 0 and versus_local["hospital-5"]["low"] > 0, versus_local
    assert over_seeds["claims"] == {"cohort_federated_within_0.005_of_pooled": True,
                                    "cohort_federated_not_below_local_anywhere": True,
                                    "cohort_federated_above_local_at_small_hospitals": True,
                                    "cohort_no_model_above_bayes": True,
                                    "federated_rank_correlation_at_least_0.6": True}
    assert [s["seed"] for s in over_seeds["per_seed"]] == [1, 2, 3, 4, 5]


@pytest.mark.xdist_group("over-seeds")  # one `over_seeds` for all; a group is scheduled first
def test_no_model_beats_the_bayes_optimal_risk_on_the_cohort_beyond_its_interval(over_seeds: dict) -> None:
    cohort = over_seeds["cohort"]
    for mode in ("federated", "pooled", "local-only"):
        for hospital, scores in cohort[mode]["per_hospital"].items():
            bayes = cohort["Bayes-optimal"]["per_hospital"][hospital]
            assert scores["auc_ci"][0] <= bayes["auc"], (mode, hospital, scores, bayes)
            assert bayes["auc_ci"][1] - bayes["auc_ci"][0] < 0.06  # 20000 patient-days: a few hundredths


@pytest.mark.xdist_group("over-seeds")  # one `over_seeds` for all; a group is scheduled first
def test_risk_ranks_patients_across_the_specs_ranges_as_the_true_risk_does(over_seeds: dict) -> None:
    """Beyond patients like the training ones: on patients drawn uniformly across the spec's ranges, the federated
    risk's rank correlation with the generator's true risk is at least 0.6 on average over seeds (the issue's bar;
    0.14 to 0.18 for the unconstrained network), and learning from five hospitals ranks them better than from one.
    (Pooled training, led by the academic centre's 12000 patient-days, ranks them at 0.587 on these seeds.)"""
    ranks = {mode: summary["mean"] for mode, summary in over_seeds["rank_correlation_across_ranges"].items()}
    assert ranks["federated"] >= 0.6, ranks
    assert ranks["federated"] > ranks["local"], ranks
    assert all(len(seed["rank_correlation_across_ranges"]) == 3 for seed in over_seeds["per_seed"])


def test_evaluate_exits_1_naming_the_claims_that_fail(home: Path) -> None:
    """One federated round of 200 steps is far from pooled training's 4000: the claims fail, and say which."""
    answer = run_cli("evaluate", "--seeds", "1", "--hospitals", "2", "--rows-per-hospital", "300", "--rounds", "1",
                     "--json", home=home, check=False)
    assert answer.returncode == 1, answer.stderr
    assert "claims failed on these seeds: cohort_federated_within_0.005_of_pooled" in answer.stderr
    document = json.loads(answer.stdout)
    assert document["claims"]["cohort_federated_within_0.005_of_pooled"] is False
    assert document["cohort"]["rows_per_hospital"] == {"hospital-1": 300, "hospital-2": 300}


def test_evaluate_refuses_seeds_it_cannot_read(home: Path) -> None:
    answer = run_cli("evaluate", "--seeds", "one-five", home=home, check=False)
    assert answer.returncode == 2 and "error: --seeds: 'one-five' is not a range like 1-5" in answer.stderr


def test_diabetes_runs_pooled_and_local_with_r2(tmp_path: Path, home: Path) -> None:
    data = tmp_path / "diabetes"
    run_cli("data", "generate", "--spec", "diabetes", "--out", str(data), home=home)
    for mode in ("pooled", "local"):
        result = run_cli_json("train", "--data", str(data), "--mode", mode, home=home)
        assert result["task"] == "regression" and result["metric"] == "r2"
        assert len(result["per_hospital"]) == 5
        assert 0.3 < result["overall"]["r2"] < 0.8  # the data set's well-known linear fit explains about half
        assert "reference" not in result


def test_demo_trains_as_processes_prints_the_table_and_serves_the_champion(home: Path) -> None:
    base = free_port_range(16)
    command = [sys.executable, "-m", "health_mlops.cli", "demo", "--rows-per-hospital", "600", "--rounds", "3",
               "--port", str(base), "--node-api-port", str(base + 1), "--node-metrics-port", str(base + 7),
               "--dashboard-port", str(base + 13), "--prometheus-port", str(base + 14), "--ops-port", str(base + 15)]
    demo = subprocess.Popen(command, env={**os.environ, "HEALTH_MLOPS_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    dashboard = f"http://127.0.0.1:{base + 13}"
    wait_until_ready(f"{dashboard}/readyz", demo, timeout_s=600)
    # Nothing of the dashboard is open, the demo's included: it made an admin login; a program needs a key.
    assert httpx.get(f"{dashboard}/api/v1/model").status_code == 401
    key = run_cli("dashboard-account", "key", "demo-test", home=home).stdout.strip()
    model = httpx.get(f"{dashboard}/api/v1/model", headers={"X-API-Key": key}).json()
    assert model["version"] == 1 and model["metrics"]["auc"] > 0.5  # the freshly trained champion
    password = (home / "credentials" / "dashboard-admin.password").read_text(encoding="utf-8").strip()
    login = httpx.post(f"{dashboard}/login", data={"username": "admin", "password": password})
    assert login.status_code == 303 and login.headers["location"] == "/"
    demo.send_signal(signal.SIGINT)
    stdout, stderr = demo.communicate(timeout=60)
    assert demo.returncode == 0, stderr
    assert f"log in as admin, password {password}" in stderr  # what the person who ran it reads
    # The live view names the replica of the last round; the summary, every round's (hospital-1 has two).
    assert "last round counted from" in stderr and "hospital-1's results came from hospital-1-" in stdout
    for text in ("federated", "pooled", "local-only", "Bayes-optimal", "hospital-5", "mean over 5 hospitals",
                 "all test rows", "v1 registered, champion", "each hospital's independent cohort",
                 "hospital-5 (600)", "federated − local-only"):
        assert text in stdout
    for issued in ("hospital-5.token", "hospital-5.crt", "hospital-5.key", "ca.crt", "aggregator.crt", "admin.crt"):
        assert (home / "credentials" / issued).is_file()  # provisioned on the first run, with no manual step
    logs = sorted(p.name for p in (home / "logs").iterdir())
    assert logs == ["aggregator.log", "dashboard.log", "hospital-1-a.log", "hospital-1-b.log", "hospital-2-a.log",
                    "hospital-3-a.log", "hospital-4-a.log", "hospital-5-a.log", "prometheus.log"]
    # Quiet, truthful logs: a clean stop is no ERROR (the nodes' long polls are answered, not cancelled), and no
    # line per HTTP request.
    for name in logs[:-1]:
        text = (home / "logs" / name).read_text(encoding="utf-8")
        assert " ERROR" not in text and "ERROR:" not in text, (name, text[-2000:])
        assert "httpx" not in text, name
    assert processes_mentioning(f"--port {base + 13}") == []  # the dashboard
    assert processes_mentioning(f"127.0.0.1:{base + 14}") == []  # Prometheus


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def test_ctrl_c_stops_every_process_the_demo_started(home: Path) -> None:
    base = free_port_range(13)
    command = [sys.executable, "-m", "health_mlops.cli", "demo", "--hospitals", "3", "--rows-per-hospital", "600",
               "--rounds", "500", "--port", str(base), "--node-api-port", str(base + 1),
               "--node-metrics-port", str(base + 7), "--ops-port", str(base + 12), "--no-serve"]
    home.mkdir(parents=True, exist_ok=True)
    err_path = home / "demo.err"  # a file, not a pipe: a pipe nobody reads until the end could stall the demo
    with open(err_path, "w") as err:
        demo = subprocess.Popen(command, env={**os.environ, "HEALTH_MLOPS_HOME": str(home)},
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    aggregator_log = home / "logs" / "aggregator.log"
    central = f"https://127.0.0.1:{base}"
    try:
        # A generous deadline: this test is about stopping, not speed (CI shares 2 CPUs).
        deadline = time.monotonic() + 600
        while not (aggregator_log.exists() and "round 1 (fit) closed" in aggregator_log.read_text()):
            assert demo.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, "the demo's run never got going"
            time.sleep(0.2)
        assert len(processes_mentioning(central)) == 4  # three hospitals, hospital-1 twice, all over TLS
    finally:
        demo.send_signal(signal.SIGINT)  # on a failure too: the demo stops what it started
        demo.wait(timeout=60)
    stderr = err_path.read_text()
    assert demo.returncode == 130, stderr
    assert "stopped" in stderr
    assert processes_mentioning(central) == [] and processes_mentioning(f"--port {base}") == []


def test_provision_issues_once_and_keeps_existing_tokens(home: Path) -> None:
    first = run_cli("provision", "--hospitals", "2", home=home)
    assert "issued admin, hospital-1, hospital-2" in first.stdout
    token = (home / "credentials" / "hospital-1.token").read_text()
    again = run_cli("provision", "--hospitals", "2", "--hospital", "hospital-extra", home=home)
    assert "issued hospital-extra" in again.stdout
    assert (home / "credentials" / "hospital-1.token").read_text() == token


def test_provision_rotates_and_revokes_a_hospitals_token_and_certificate(home: Path) -> None:
    from health_mlops.trust.credentials import TokenAuthority, bearer
    from health_mlops.trust.pki import load_certificate, revoked_serials

    credentials = home / "credentials"
    run_cli("provision", "--hospitals", "2", home=home)
    token = (credentials / "hospital-1.token").read_text().strip()
    serial = load_certificate(credentials / "hospital-1.crt").serial_number
    rotated = run_cli("provision", "--rotate", "hospital-1", home=home)
    assert "rotated hospital-1" in rotated.stdout
    assert load_certificate(credentials / "hospital-1.crt").serial_number != serial
    assert serial in revoked_serials(credentials)
    assert TokenAuthority.from_directory(credentials).identify(bearer(token)["Authorization"]) is None
    new_token = (credentials / "hospital-1.token").read_text().strip()
    assert TokenAuthority.from_directory(credentials).identify(bearer(new_token)["Authorization"]) is not None

    hospital_2 = load_certificate(credentials / "hospital-2.crt").serial_number
    revoked = run_cli("provision", "--revoke", "hospital-2", home=home)
    assert "revoked hospital-2" in revoked.stdout
    assert not (credentials / "hospital-2.token").exists() and not (credentials / "hospital-2.crt").exists()
    assert TokenAuthority.from_directory(credentials).hospitals == ["hospital-1"]
    assert hospital_2 in revoked_serials(credentials)
    unknown = run_cli("provision", "--revoke", "hospital-9", home=home, check=False)
    assert unknown.returncode == 2 and "hospital-9.token: no token to revoke" in unknown.stderr
    admin = run_cli("provision", "--revoke", "admin", home=home, check=False)
    assert admin.returncode == 2 and "only rotated" in admin.stderr
    # Each credential issued, rotated or revoked is an audit line, MAC'd with the audit key provision issued.
    audited = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    *issued, rotated_line, revoked_line = [(e["action"], e["credential"]) for e in audited]
    assert {action for action, _ in issued} == {"provision issue"}
    assert {"admin", "aggregator", "dashboard", "hospital-1", "hospital-2"} <= {name for _, name in issued}
    assert (rotated_line, revoked_line) == (("provision rotate", "hospital-1"), ("provision revoke", "hospital-2"))
    assert all(e["actor"].endswith("(provision)") and e["mac"] for e in audited)
    assert "the chain is intact and every MAC matches" in run_cli("audit", "verify", home=home).stdout


def test_services_refuse_to_start_without_credentials(tmp_path: Path, home: Path) -> None:
    aggregator = run_cli("aggregator", "--port", str(free_port_range(1)), home=home, check=False, timeout=60)
    assert aggregator.returncode == 2 and "provision" in aggregator.stderr
    node = run_cli("node", "--hospital-id", "hospital-1", "--data-dir", str(tmp_path), home=home, check=False,
                   timeout=60)
    assert node.returncode == 2 and "hospital-1.token" in node.stderr


def test_a_node_refuses_a_plain_http_aggregator_unless_told_it_is_a_test_bench(tmp_path: Path, home: Path) -> None:
    """Over http:// the hospital's token and updates would travel in clear: refused before anything is read; with
    --insecure-plain-http it goes on (here to its missing credential) with a warning in its log."""
    plain = ("node", "--hospital-id", "hospital-1", "--data-dir", str(tmp_path), "--central-url", "http://127.0.0.1:9")
    refused = run_cli(*plain, home=home, check=False, timeout=60)
    assert refused.returncode == 2 and "--insecure-plain-http" in refused.stderr and "in clear" in refused.stderr
    allowed = run_cli(*plain, "--insecure-plain-http", home=home, check=False, timeout=60)
    assert allowed.returncode == 2 and "hospital-1.token" in allowed.stderr
    assert "WARNING" in allowed.stderr and "plain http" in allowed.stderr
    odd = run_cli("node", "--hospital-id", "hospital-1", "--data-dir", str(tmp_path), "--central-url", "ftp://x",
                  home=home, check=False, timeout=60)
    assert odd.returncode == 2 and "not an https:// URL" in odd.stderr
