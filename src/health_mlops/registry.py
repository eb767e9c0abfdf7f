"""The model registry: MLflow's tracking server and model registry, with a quality gate and an audit log.

Each federated run becomes one MLflow run (its config as params, per-round global metrics and per-hospital
metrics with step = round) and one registered model version holding the ONNX model (preprocessing inside)
and the dataset spec. A new version gets the `champion` alias only if its federated test metric is no worse
than the current champion's minus a tolerance; otherwise it is the `challenger`. Promotions and rollbacks
are admin actions and each is appended to the audit log. A run that trained exactly as a registered version did
(the same code, task, settings and data: its `fingerprint`) is logged as a run but registers no new version.

Embedded by default (a sqlite file and a local artifact folder under `$HEALTH_MLOPS_HOME/mlflow`, no server);
`MLFLOW_TRACKING_URI` points at a server instead (Kubernetes). This module stores and loads artifacts only
and imports no torch, so the serving image can use it.
"""

from __future__ import annotations

import hmac
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from health_mlops.errors import RegistryError
from health_mlops.trust.audit import Anchor, AuditLog, attestation
from health_mlops.web import strict_json

CHAMPION = "champion"
CHAMPION_SINCE = "champion_since"  # version tag: when it last became champion (seconds since the epoch)
CHALLENGER = "challenger"
# Version tags that tie the registry to the audit log: the seq and hash of the version's latest audit line (an
# `audit.Anchor` for `audit verify`), and the attestation of its latest promotion (`audit.attestation`), which a
# dashboard checks before it serves the version: an alias written into MLflow by hand has none.
AUDIT_ANCHOR, CHAMPION_ATTESTATION = "audit_anchor", "champion_attestation"
QUALITY_GATE = "quality_gate"  # version tag: the gate has decided its alias (a registration is complete)
PRIVACY_EPSILON, PRIVACY_DELTA = "privacy_epsilon", "privacy_delta"  # version tags of a DP-trained model
SECURE_AGGREGATION = "secure_aggregation"  # version tag: "true" when the aggregator saw only sums of updates
TRAINING_FINGERPRINT = "training_fingerprint"  # version tag: what its training was (TrainingRecord.fingerprint)
SAME_MODEL_AS = "same_model_as"  # run tag: the version a run trained the same model as
EXPERIMENT_NAME = "federated-training"
MODEL_FILE = "model.onnx"
SPEC_FILE = "spec.yaml"
REPORT_FILE = "report.json"
_ARTIFACT_DIR = "model"
_MLFLOW_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


@dataclass(frozen=True)
class ModelVersion:
    version: int
    metric_name: str
    metric: float
    aliases: list[str]
    federation_run: str
    mlflow_run_id: str
    created_at: float
    privacy: dict[str, float] | None = None  # {"epsilon", "delta"} of a model trained with differential privacy
    secure_aggregation: bool = False  # trained with the aggregator seeing only sums of the hospitals' updates

    def privacy_text(self) -> str:
        """How users see a version's privacy: "ε 2.91, δ 1e-05", "secure aggregation", both, or "none"."""
        parts = ([] if self.privacy is None else [f"ε {self.privacy['epsilon']:.2f}, δ {self.privacy['delta']:g}"]) + (
            ["secure aggregation"] if self.secure_aggregation else [])
        return "; ".join(parts) or "none"

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "metric_name": self.metric_name, "metric": self.metric,
                "aliases": self.aliases, "federation_run": self.federation_run,
                "mlflow_run_id": self.mlflow_run_id, "created_at": self.created_at, "privacy": self.privacy,
                "secure_aggregation": self.secure_aggregation}


@dataclass(frozen=True)
class TrainingRecord:
    """What a finished federated run hands to the registry."""

    federation_run: str
    params: Mapping[str, Any]  # flat: name -> value
    round_metrics: list[tuple[int, dict[str, float]]]  # (round, global metrics of the model entering it)
    hospital_metrics: list[tuple[int, str, dict[str, float]]]  # (round, hospital, metrics)
    final_metrics: dict[str, float]  # federated evaluation of the final model
    metric_name: str  # the task's primary metric, higher is better
    onnx_model: bytes
    spec_yaml: str
    # With differential privacy: the largest ε any hospital spent over the run, its δ, and each hospital's ε.
    privacy: dict[str, float] | None = None
    hospital_epsilons: dict[str, float] | None = None
    pooled_metrics: dict[str, float] = field(default_factory=dict)  # every test row together, from counts
    report: dict[str, Any] | None = None  # the federated model report (fl.report), stored as report.json
    # A digest of everything that decided the model (empty: none known); runs with the same one share a version.
    fingerprint: str = ""
    secure_aggregation: bool = False


@dataclass(frozen=True)
class QualityGate:
    """When a new version becomes champion: its metric no worse than the champion's by more than `tolerance`,
    and, if `calibration_band` is set, its calibration slope (mean over hospitals) within 1 ± that band."""

    tolerance: float = 0.005
    calibration_band: float | None = None

    def refusal(self, record: TrainingRecord, champion: ModelVersion | None) -> str | None:
        """Why `record` may not become champion over `champion`, or None."""
        metric = record.final_metrics[record.metric_name]
        if champion is not None and metric < champion.metric - self.tolerance:
            return (f"{record.metric_name} {metric:.4f} below champion v{champion.version} {champion.metric:.4f} "
                    f"- {self.tolerance}")
        if self.calibration_band is not None:
            slope = record.final_metrics.get("calibration_slope")
            if slope is None or abs(slope - 1) > self.calibration_band:
                shown = "undefined" if slope is None else f"{slope:.3f}"
                return f"calibration slope {shown} outside 1 ± {self.calibration_band}"
        return None


def default_tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(home / 'mlflow' / 'mlflow.db').resolve()}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as MLflow params: {"strategy": {"name": "fedavg"}} -> {"strategy.name": "fedavg"}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Registry:
    def __init__(self, home: Path, model_name: str, *, tracking_uri: str | None = None,
                 audit: AuditLog | None = None) -> None:
        self.home = home
        self.model_name = model_name
        self.tracking_uri = tracking_uri or default_tracking_uri(home)
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self.audit = audit or AuditLog(home / "audit.log")  # the same file as Settings.audit_log

    @property
    def audit_log(self) -> Path:
        return self.audit.path

    # --- writing --------------------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the cwd
            location = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        return self.client.create_experiment(EXPERIMENT_NAME, artifact_location=location)

    def register(self, record: TrainingRecord, *, gate: QualityGate) -> ModelVersion:
        """Log the run, register its model, and apply the quality gate; the version returned is another run's
        (its `federation_run`) when this run trained the same model as that one (`TrainingRecord.fingerprint`).
        Idempotent: a federated run registered before (an aggregator that crashed before it recorded the
        registration registers again) gets its existing version, and the quality gate applied if the crash came
        before it."""
        version = self._version_of(record.federation_run)
        if version is None:
            same = self._version_trained_as(record.fingerprint)
            run_id = self._run_of(record.federation_run) or self._log_run(record)
            if same is not None:
                self.client.set_tag(run_id, SAME_MODEL_AS, str(same))
                self._audit("unchanged", same, "aggregator",
                            f"{record.federation_run} trained as v{same} did (same code, task, settings and data)")
                return self.version(same)
            version = self._create_version(record, run_id)
        if QUALITY_GATE not in self.client.get_model_version(self.model_name, str(version)).tags:
            self._quality_gate(version, record, gate)
        return self.version(version)

    def _version_of(self, federation_run: str) -> int | None:
        found = [int(v.version) for v in self.client.search_model_versions(f"name='{self.model_name}'")
                 if v.tags.get("federation_run") == federation_run]
        return min(found) if found else None

    def _version_trained_as(self, fingerprint: str) -> int | None:
        if not fingerprint:
            return None
        found = [int(v.version) for v in self.client.search_model_versions(f"name='{self.model_name}'")
                 if v.tags.get(TRAINING_FINGERPRINT) == fingerprint]
        return min(found) if found else None

    def _run_of(self, federation_run: str) -> str | None:
        """The MLflow run a federated run logged before a crash cut its registration short, if any."""
        experiment = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            return None
        found = self.client.search_runs([experiment.experiment_id],
                                        filter_string=f"tags.federation_run = '{federation_run}'", max_results=1)
        return found[0].info.run_id if found else None

    def _log_run(self, record: TrainingRecord) -> str:
        """The run in MLflow's tracking: its settings, every round's metrics, its artifacts."""
        run = self.client.create_run(self._experiment_id(), run_name=record.federation_run,
                                     tags={"federation_run": record.federation_run})
        run_id = run.info.run_id
        now_ms = int(time.time() * 1000)
        metrics = [Metric(f"global.{name}", value, now_ms, step) for step, values in record.round_metrics
                   for name, value in values.items()]
        metrics += [Metric(f"{hospital}.{name}", value, now_ms, step)
                    for step, hospital, values in record.hospital_metrics for name, value in values.items()]
        metrics += [Metric(f"final.{name}", value, now_ms, 0) for name, value in record.final_metrics.items()]
        metrics += [Metric(f"all_test_rows.{name}", value, now_ms, 0) for name, value in record.pooled_metrics.items()]
        if record.privacy is not None:
            metrics += [Metric(f"privacy.{name}", value, now_ms, 0) for name, value in record.privacy.items()]
            metrics += [Metric(f"{hospital}.privacy_epsilon", value, now_ms, 0)
                        for hospital, value in (record.hospital_epsilons or {}).items()]
        params = [Param(k, str(v)) for k, v in flatten(record.params).items()]
        self.client.log_batch(run_id, params=params)
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + _MLFLOW_BATCH])
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / _ARTIFACT_DIR
            folder.mkdir()
            (folder / MODEL_FILE).write_bytes(record.onnx_model)
            (folder / SPEC_FILE).write_text(record.spec_yaml, encoding="utf-8")
            if record.report is not None:
                (folder / REPORT_FILE).write_text(strict_json.dumps(record.report), encoding="utf-8")
            self.client.log_artifacts(run_id, str(folder), _ARTIFACT_DIR)
        self.client.set_terminated(run_id)
        return run_id

    def _create_version(self, record: TrainingRecord, run_id: str) -> int:
        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException:
            pass  # it exists
        metric = record.final_metrics[record.metric_name]
        privacy = {} if record.privacy is None else {PRIVACY_EPSILON: repr(record.privacy["epsilon"]),
                                                     PRIVACY_DELTA: repr(record.privacy["delta"])}
        created = self.client.create_model_version(
            self.model_name, f"runs:/{run_id}/{_ARTIFACT_DIR}", run_id=run_id,
            tags={"metric_name": record.metric_name, "metric": repr(metric),
                  "federation_run": record.federation_run, **privacy,
                  **({SECURE_AGGREGATION: "true"} if record.secure_aggregation else {}),
                  **({TRAINING_FINGERPRINT: record.fingerprint} if record.fingerprint else {})})
        version = int(created.version)
        self._audit("register", version, "aggregator", f"{record.federation_run}: {record.metric_name} {metric:.4f}")
        return version

    def _quality_gate(self, version: int, record: TrainingRecord, gate: QualityGate) -> None:
        metric = record.final_metrics[record.metric_name]
        champion = self.champion()
        refusal = gate.refusal(record, champion)
        if champion is not None and champion.version == version:
            pass  # promoted before a crash cut the gate short
        elif refusal is None:
            self._set_champion(version, actor="quality-gate", action="promote",
                               reason=f"{record.metric_name} {metric:.4f}" + (
                                   "" if champion is None else f" vs champion v{champion.version} "
                                                               f"{champion.metric:.4f} - {gate.tolerance}"))
        else:
            self.client.set_registered_model_alias(self.model_name, CHALLENGER, str(version))
            self._audit("challenger", version, "quality-gate", refusal)
        self.client.set_model_version_tag(self.model_name, str(version), QUALITY_GATE, "applied")

    def _set_champion(self, version: int, *, actor: str, action: str, reason: str) -> None:
        # Audited first: the line's seq and hash go into the attestation the dashboards check before serving.
        record = self._audit(action, version, actor, reason)
        key = self.audit.key
        mac = attestation(key, self.model_name, version, record["seq"], record["hash"]) if key else ""
        self.client.set_model_version_tag(self.model_name, str(version), CHAMPION_ATTESTATION,
                                          f"{record['seq']}:{record['hash']}:{mac}")
        # When each version last became champion is kept by MLflow itself, on the version: rollback reads it
        # there, never from the audit log (which records, and decides nothing).
        self.client.set_model_version_tag(self.model_name, str(version), CHAMPION_SINCE, repr(time.time()))
        self.client.set_registered_model_alias(self.model_name, CHAMPION, str(version))
        try:
            challenger = self.client.get_model_version_by_alias(self.model_name, CHALLENGER)
            if int(challenger.version) == version:
                self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        except MlflowException:
            pass

    def _audit(self, action: str, version: int, actor: str, reason: str) -> dict[str, Any]:
        """Append the audit line, and anchor it on the version (MLflow keeps what the log's writer cannot cut)."""
        record = self.audit.append(action, actor, model=self.model_name, version=version, reason=reason)
        self.client.set_model_version_tag(self.model_name, str(version), AUDIT_ANCHOR,
                                          f"{self.audit.name}:{record['seq']}:{record['hash']}")
        return record

    def audit_anchors(self, log_name: str) -> list[Anchor]:
        """Each version's latest line in the audit log `log_name`, as MLflow recorded it (`audit verify` checks
        that log against them)."""
        try:
            found = self.client.search_model_versions(f"name='{self.model_name}'")
        except MlflowException:
            return []
        anchors = []
        for raw in found:
            log, seq, digest = (str(raw.tags.get(AUDIT_ANCHOR, "")).split(":") + ["", "", ""])[:3]
            if log == log_name and seq.isdigit():
                anchors.append(Anchor(int(seq), digest or None, f"MLflow ({self.model_name} v{raw.version})"))
        return anchors

    def champion_refusal(self, version: int) -> str | None:
        """Why a dashboard must not serve `version` as champion, or None: it became champion through this registry
        (its attestation matches its audit line, under the audit key where this process holds it)."""
        raw = self.client.get_model_version(self.model_name, str(version))
        seq, _, rest = str(raw.tags.get(CHAMPION_ATTESTATION, "")).partition(":")
        digest, _, mac = rest.partition(":")
        if not (seq.isdigit() and digest):
            return "it was never promoted through the registry (no audited promotion: an alias set by hand?)"
        key = self.audit.key
        if key is not None and not hmac.compare_digest(mac, attestation(key, self.model_name, version, int(seq),
                                                                        digest)):
            return "its promotion's attestation does not match the audit key (written outside the registry?)"
        return None

    def promote(self, version: int, *, actor: str) -> ModelVersion:
        self.version(version)  # refuses an unknown version
        champion = self.champion()  # an alias set by hand in MLflow is promoted again, through the audit log
        if champion is not None and champion.version == version and self.champion_refusal(version) is None:
            raise RegistryError(f"v{version} is already the champion: nothing to promote")
        self._set_champion(version, actor=actor, action="promote", reason="by hand")
        return self.version(version)

    def rollback(self, *, actor: str) -> ModelVersion:
        """Make the champion before the current one champion again: of the other versions that were ever
        champion (by MLflow's version tags), the one that was most recently."""
        current = self.champion()
        if current is None:
            raise RegistryError("there is no champion to roll back from")
        earlier = sorted((float(raw.tags[CHAMPION_SINCE]), int(raw.version))
                         for raw in self.client.search_model_versions(f"name='{self.model_name}'")
                         if CHAMPION_SINCE in raw.tags and int(raw.version) != current.version)
        if not earlier:
            raise RegistryError(f"v{current.version} is the only model that was ever champion")
        target = earlier[-1][1]
        self._set_champion(target, actor=actor, action="rollback", reason=f"from v{current.version}")
        return self.version(target)

    # --- reading --------------------------------------------------------------------------------------

    def audit_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.audit.entries() if e.get("model") == self.model_name]

    def version(self, version: int) -> ModelVersion:
        try:
            raw = self.client.get_model_version(self.model_name, str(version))
        except MlflowException:
            raise RegistryError(f"{self.model_name} has no version {version}") from None
        return ModelVersion(version=int(raw.version), metric_name=raw.tags.get("metric_name", ""),
                            metric=float(raw.tags.get("metric", "nan")), aliases=sorted(raw.aliases or []),
                            federation_run=raw.tags.get("federation_run", ""), mlflow_run_id=raw.run_id or "",
                            created_at=raw.creation_timestamp / 1000,
                            privacy={"epsilon": float(raw.tags[PRIVACY_EPSILON]),
                                     "delta": float(raw.tags[PRIVACY_DELTA])} if PRIVACY_EPSILON in raw.tags else None,
                            secure_aggregation=raw.tags.get(SECURE_AGGREGATION) == "true")

    def versions(self) -> list[ModelVersion]:
        try:
            found = self.client.search_model_versions(f"name='{self.model_name}'")
        except MlflowException:
            return []
        return sorted((self.version(int(v.version)) for v in found), key=lambda v: v.version)

    def champion(self) -> ModelVersion | None:
        try:
            raw = self.client.get_model_version_by_alias(self.model_name, CHAMPION)
        except MlflowException:
            return None
        return self.version(int(raw.version))

    def load_report(self, version: int) -> dict[str, Any] | None:
        """The federated model report of a version (None for versions registered before reports existed)."""
        raw = self.client.get_model_version(self.model_name, str(version))
        if raw.run_id is None:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            try:
                path = Path(self.client.download_artifacts(raw.run_id, f"{_ARTIFACT_DIR}/{REPORT_FILE}", scratch))
            except (MlflowException, OSError):
                return None
            return json.loads(path.read_text(encoding="utf-8"))

    def load_artifacts(self, version: int) -> tuple[bytes, str]:
        """(ONNX model, spec YAML) of a version."""
        raw = self.client.get_model_version(self.model_name, str(version))
        if raw.run_id is None:
            raise RegistryError(f"{self.model_name} v{version} has no MLflow run: its artifacts cannot be found")
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(self.client.download_artifacts(raw.run_id, _ARTIFACT_DIR, scratch))
            return (folder / MODEL_FILE).read_bytes(), (folder / SPEC_FILE).read_text(encoding="utf-8")
