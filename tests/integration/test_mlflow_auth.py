"""MLflow as the deployments run it: `mlflow server --app-name basic-auth` (a real server process), set up by
`health-mlops mlflow-auth`. Nobody without a login reads or writes; the aggregator (MLflow's admin) registers; the
dashboards' user reads, moves the champion through the registry, and cannot write runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from health_mlops.registry import EXPERIMENT_NAME, QualityGate, Registry
from health_mlops.trust.audit import AuditLog
from tests.conftest import free_port_range, run_cli, wait_until_ready
from tests.unit.test_registry import record

pytestmark = pytest.mark.process

ADMIN_PASSWORD = "the aggregator's MLflow password"
DASHBOARD_PASSWORD = "the dashboards' MLflow password"
AUTH_CONFIG = """[mlflow]
default_permission = READ
database_uri = sqlite:///{folder}/basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "basic_auth.ini"
    config.write_text(AUTH_CONFIG.format(folder=tmp_path))
    port = free_port_range(1)
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "the server's CSRF key"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
                               "127.0.0.1", "--port", str(port), "--backend-store-uri",
                               f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "art"),
                               "--serve-artifacts", "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/health", server, timeout_s=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def as_user(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None) -> None:
    """What MLflow's client presents from now on (it reads the environment at each request)."""
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_only_the_aggregator_writes_and_the_dashboards_read_and_promote(mlflow_server: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    password = tmp_path / "dashboard-password"
    password.write_text(DASHBOARD_PASSWORD + "\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # The aggregator's login as its pod has it: the name in its settings, the password in a mounted Secret file.
    admin_password = tmp_path / "admin-password"
    admin_password.write_text("not the admin's\n")
    monkeypatch.setenv("HEALTH_MLOPS_MLFLOW_USERNAME", "admin")
    monkeypatch.setenv("HEALTH_MLOPS_MLFLOW_PASSWORD_FILE", str(admin_password))
    refused = run_cli("mlflow-auth", "--dashboard-password-file", str(password), home=home, check=False)
    assert refused.returncode == 2 and "MLflow refused its admin" in refused.stderr
    admin_password.write_text(ADMIN_PASSWORD + "\n")
    done = run_cli("mlflow-auth", "--dashboard-password-file", str(password), home=home)
    assert "created the MLflow user dashboard" in done.stdout
    assert "set the MLflow user dashboard's password" in run_cli(  # again: idempotent
        "mlflow-auth", "--dashboard-password-file", str(password), home=home).stdout

    as_user(monkeypatch, "admin", ADMIN_PASSWORD)  # in this process: what the CLI's settings hand MLflow's client
    audit = AuditLog(home / "audit.log", bytes(range(32)))
    aggregator = Registry(home, "health-risk", audit=audit)
    aggregator.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.0))
    aggregator.register(record("run-b", 0.70), gate=QualityGate(tolerance=0.0))  # a challenger

    as_user(monkeypatch, None, None)  # whoever reaches MLflow without a login: nothing
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(mlflow_server).get_registered_model("health-risk")
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(mlflow_server).set_registered_model_alias("health-risk", "champion", "2")

    as_user(monkeypatch, "dashboard", DASHBOARD_PASSWORD)
    dashboard = Registry(home, "health-risk", audit=audit)
    assert dashboard.champion().version == 1  # type: ignore[union-attr]
    assert dashboard.load_artifacts(1) == (b"onnx-run-a", "name: test\n")
    dashboard.promote(2, actor="ada (dashboard)")  # an admin's promotion from the dashboard
    assert dashboard.champion().version == 2 and dashboard.champion_refusal(2) is None  # type: ignore[union-attr]
    experiment = MlflowClient(mlflow_server).get_experiment_by_name(EXPERIMENT_NAME)
    assert experiment is not None
    with pytest.raises(MlflowException, match="403"):  # the aggregator's runs are the aggregator's to write
        MlflowClient(mlflow_server).create_run(experiment.experiment_id)
