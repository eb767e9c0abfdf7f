"""Every setting the project reads, with its environment variable: the one place they are defined.

Settings are read from the environment each time `get_settings()` is called, so a test or a subprocess
that sets `HEALTH_MLOPS_HOME` sees its own value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from health_mlops.errors import CredentialError
from health_mlops.fl.strategy_table import STRATEGIES

if TYPE_CHECKING:
    from health_mlops.trust.audit import AuditLog


class TrainingDefaults(BaseSettings):
    """Local training hyper-parameters, shared by pooled, local and federated training."""

    model_config = SettingsConfigDict(env_prefix="HEALTH_MLOPS_TRAIN_")

    epochs: int = Field(8, ge=1, description="epochs of pooled or local-only training when asked for in epochs")
    steps: int = Field(4000, ge=1, description="optimiser steps of pooled or local-only training (the budget, "
                       "whatever the site's size; early stopping may end it sooner)")
    local_steps: int = Field(200, ge=1, description="optimiser steps each hospital takes per federated round")
    validation_fraction: float = Field(0.2, ge=0, lt=1, description="share of each hospital's training rows held "
                                       "out to stop training early and to choose the federation's best round")
    patience: int = Field(10, ge=1, description="validation checks without a better loss before training stops")
    learning_rate: float = Field(0.001, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(1e-2, ge=0, description="L2 penalty; rare events and small sites overfit without it")
    seed: int = 0
    # DP-SGD adds its noise once per batch, so it learns from large batches at a larger step (docs/privacy.md): 0.16 is
    # the batch of 512 it was measured with on 3200-row hospitals; as a share, a small site samples (and spends) alike.
    dp_sampling_rate: float = Field(0.16, gt=0, lt=1, description="each hospital's DP-SGD batch as a share of its "
                                    "training rows (a federated run with differential privacy)")
    dp_learning_rate: float = Field(0.01, gt=0, description="learning rate of a run with differential privacy")


class FederationDefaults(BaseSettings):
    """What `health-mlops start-run` asks the aggregator for (learning rate and batch size: TrainingDefaults)."""

    model_config = SettingsConfigDict(env_prefix="HEALTH_MLOPS_FL_")

    rounds: int = Field(20, ge=1, le=10_000)
    local_epochs: int = Field(1, ge=1, le=100, description="local epochs per round at each hospital")
    strategy: str = Field("fedavg", description=f"one of {', '.join(STRATEGIES)}")
    min_hospitals: int = Field(2, ge=1, description="results that close a round at its deadline")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, name: str) -> str:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
        return name


class Settings(BaseSettings):
    """Process-wide settings; env vars are `HEALTH_MLOPS_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="HEALTH_MLOPS_")

    home: Path = Field(Path(".health-mlops"), description="all local state of a run lives here")
    split_seed: int = Field(42, description="seed of every hospital's train/test split")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of a hospital's rows held out for test")
    stratified_split: bool = Field(True, description="split each hospital's rows by outcome (binary tasks) or "
                                   "target quintile (regression), so its test rows hold events in its own share")
    torch_threads: int = Field(1, ge=1, description="small models train fastest on one thread")
    spec: str = Field("health-risk", description="dataset spec: a built-in name or a YAML path")
    models_dir_override: Path | None = Field(None, alias="HEALTH_MLOPS_MODELS_DIR",
                                             description="checkpoints and model artifacts (default: home/models)")
    audit_log_override: Path | None = Field(None, alias="HEALTH_MLOPS_AUDIT_LOG",
                                            description="the audit log (default: home/audit.log)")
    audit_log_name: str = Field("local", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$",
                                description="which audit log this process writes, where a consortium keeps several "
                                "(Kubernetes: the aggregator's, each dashboard replica's); the registry's anchors "
                                "name it, and `audit verify` checks a log against its own")
    credentials_dir_override: Path | None = Field(None, alias="HEALTH_MLOPS_CREDENTIALS_DIR",
                                                  description="tokens from `provision` (default: home/credentials)")
    token: str | None = Field(None, description="a node's bearer token (else read from the credentials folder)")
    quality_gate_tolerance: float = Field(0.005, ge=0, description="a new model becomes champion unless its "
                                          "federated test metric is worse than the champion's by more than this")
    quality_gate_calibration: float | None = Field(None, gt=0, description="binary tasks: a new model becomes "
                                                   "champion only if its calibration slope (mean over hospitals) "
                                                   "is within 1 ± this; unset: not checked")
    poll_wait_s: float = Field(20.0, gt=0, le=300, description="how long a node's long poll for a task waits")
    aggregator_url: str = Field("https://127.0.0.1:8080", description="where the dashboard reads live training")
    dashboard_accounts_override: Path | None = Field(
        None, alias="HEALTH_MLOPS_DASHBOARD_ACCOUNTS", description="the dashboard's users (argon2id password hashes) "
        "and role-bound API keys, from `health-mlops dashboard-account` (default: credentials/dashboard-accounts.json)")
    session_idle_minutes: float = Field(15.0, gt=0, le=24 * 60, description="a dashboard session ends after this "
                                        "long without the user doing anything")
    session_cookie_secure: bool = Field(False, description="send the session cookie over HTTPS only (set it where "
                                        "the dashboard is reached over HTTPS, as behind the Kubernetes ingress)")
    mlflow_username: str | None = Field(None, description="who this process is to an MLflow server with basic-auth "
                                        "(the aggregator: admin; the dashboards: dashboard; `trust/mlflow_auth.py`)")
    mlflow_password_file: Path | None = Field(None, description="that login's password, from a mounted Secret")
    dashboard_tls_cert: Path | None = Field(None, description="the dashboard serves HTTPS with this certificate "
                                            "(`provision` issues dashboard.crt) and dashboard_tls_key; unset: HTTP")
    dashboard_tls_key: Path | None = None
    admin_token: str | None = Field(None, description="the dashboard's admin token for the aggregator (else read "
                                    "from the credentials folder)")
    mlflow_ui_url: str | None = Field(None, description="the MLflow UI over the registry, linked from the dashboard")
    prometheus_url: str | None = Field(None, description="the Prometheus scraping the services, linked from the "
                                       "dashboard (the demo sets its own)")
    node_status_urls: dict[str, str] = Field(default_factory=dict, description="node id -> its status page (the "
                                             "node API's /v1/status), linked from the dashboard's Hospitals tab; "
                                             "JSON (the demo sets its nodes')")
    prometheus_rules: Path | None = Field(None, description="alert rules for the demo's Prometheus (default: the "
                                          "repository's monitoring/alerts.yml)")
    prometheus_scrape_interval_s: float = Field(5.0, gt=0, le=300, description="the demo's Prometheus scrape and "
                                                "rule evaluation interval")
    crash_at: str | None = Field(None, description="tests only: kill the aggregator at this crash point, "
                                 "`<point>[:<n>]` (system/faults.py)")

    @property
    def quality_dir(self) -> Path:
        """Where validation reports and quarantined rows are written."""
        return self.home / "quality"

    @property
    def audit_log(self) -> Path:
        """Every admin action, refused attempt and model promotion, one hash-chained JSON line each."""
        return self.audit_log_override or self.home / "audit.log"

    @property
    def models_dir(self) -> Path:
        return self.models_dir_override or self.home / "models"

    @property
    def credentials_dir(self) -> Path:
        return self.credentials_dir_override or self.home / "credentials"

    @property
    def dashboard_accounts(self) -> Path:
        from health_mlops.trust.access import ACCOUNTS_FILE_NAME

        return self.dashboard_accounts_override or self.credentials_dir / ACCOUNTS_FILE_NAME


class NodeSettings(BaseSettings):
    """A hospital node's identity and wiring, under the env var names the Kubernetes manifests set."""

    model_config = SettingsConfigDict(populate_by_name=True)

    hospital_id: str | None = Field(None, alias="HOSPITAL_ID")
    node_id: str | None = Field(None, alias="NODE_ID", description="this replica's name (default: host name)")
    city_name: str = Field("", alias="CITY_NAME")
    central_url: str = Field("https://127.0.0.1:8080", alias="CENTRAL_URL", description="the aggregator")
    data_dir: Path | None = Field(None, alias="DATA_DIR", description="this hospital's data folder")
    api_port: int = Field(5001, alias="NODE_API_PORT")
    metrics_port: int = Field(8001, alias="METRICS_PORT")
    # The hospital's own terms, whatever a run asks (fl.secure_fit.ParticipationPolicy).
    require_secure_aggregation: bool = Field(False, alias="REQUIRE_SECURE_AGGREGATION", description="refuse the fit "
                                             "tasks of runs without secure aggregation: no update leaves in the clear")
    min_colluding_hospitals: int = Field(0, ge=0, le=1000, alias="MIN_COLLUDING_HOSPITALS", description="take part "
                                         "only in secure rounds whose threshold tolerates this many hospitals "
                                         "colluding with the aggregator")


def get_settings() -> Settings:
    return Settings()


def use_mlflow_login(settings: Settings) -> None:
    """Hand the configured MLflow login to MLflow's client, which reads it from the environment at each request
    (the password comes from a file, a mounted Secret, not from the pod's environment)."""
    if settings.mlflow_username and settings.mlflow_password_file:
        try:
            password = settings.mlflow_password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialError(f"{settings.mlflow_password_file}: cannot read the MLflow password "
                                  f"({exc.strerror})") from None
        os.environ["MLFLOW_TRACKING_USERNAME"] = settings.mlflow_username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password


def settings_audit_log(settings: Settings) -> AuditLog:
    """The audit log of these settings, with the audit key if `provision` issued one."""
    from health_mlops.trust.audit import AuditLog, load_audit_key

    return AuditLog(settings.audit_log, load_audit_key(settings.credentials_dir), name=settings.audit_log_name)


def get_training_defaults() -> TrainingDefaults:
    return TrainingDefaults()


def get_federation_defaults() -> FederationDefaults:
    return FederationDefaults()


def get_node_settings() -> NodeSettings:
    return NodeSettings()
