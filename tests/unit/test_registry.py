"""The registry on MLflow's real sqlite store: logging, the quality gate, promotion, rollback, audit."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from health_mlops.registry import (CHALLENGER, CHAMPION, CHAMPION_ATTESTATION, SAME_MODEL_AS, QualityGate, Registry,
                                   RegistryError, TrainingRecord)
from health_mlops.trust.audit import AuditLog
from tests.conftest import with_empty_mlflow_db


def record(name: str, auc: float) -> TrainingRecord:
    return TrainingRecord(
        federation_run=name, params={"rounds": 2, "strategy": {"name": "fedavg"}},
        round_metrics=[(1, {"auc": 0.6}), (2, {"auc": 0.7})],
        hospital_metrics=[(1, "hospital-1", {"auc": 0.6}), (2, "hospital-1", {"auc": 0.7})],
        final_metrics={"auc": auc, "brier": 0.1}, metric_name="auc", onnx_model=f"onnx-{name}".encode(),
        spec_yaml="name: test\n")


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Registry:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Registry(with_empty_mlflow_db(tmp_path, empty_mlflow_db), "health-risk")


def test_the_first_model_is_champion_and_its_run_is_logged(registry: Registry, tmp_path: Path) -> None:
    version = registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.005))
    assert version.version == 1 and version.aliases == [CHAMPION] and version.metric == 0.80
    assert registry.load_artifacts(1) == (b"onnx-run-a", "name: test\n")
    history = registry.client.get_metric_history(version.mlflow_run_id, "global.auc")
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.7)]
    assert registry.client.get_run(version.mlflow_run_id).data.params["strategy.name"] == "fedavg"
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()


def test_a_private_models_epsilon_and_delta_are_stored_with_its_version(registry: Registry) -> None:
    private = replace(record("run-dp", 0.78), privacy={"epsilon": 2.91, "delta": 1e-5},
                      hospital_epsilons={"hospital-1": 2.91, "hospital-2": 2.5})
    version = registry.register(private, gate=QualityGate(tolerance=0.005))
    assert registry.version(version.version).privacy == {"epsilon": 2.91, "delta": 1e-5}
    assert version.to_json()["privacy"] == {"epsilon": 2.91, "delta": 1e-5}
    assert version.privacy_text() == "ε 2.91, δ 1e-05"
    metrics = registry.client.get_run(version.mlflow_run_id).data.metrics
    assert metrics["privacy.epsilon"] == 2.91 and metrics["privacy.delta"] == 1e-5
    assert metrics["hospital-2.privacy_epsilon"] == 2.5
    plain = registry.register(record("run-plain", 0.80), gate=QualityGate(tolerance=0.005))
    assert plain.privacy is None and plain.privacy_text() == "none"
    secure = registry.register(replace(record("run-secure", 0.80), secure_aggregation=True), gate=QualityGate())
    both = registry.register(replace(private, federation_run="run-both", secure_aggregation=True), gate=QualityGate())
    assert registry.version(secure.version).secure_aggregation and secure.privacy_text() == "secure aggregation"
    assert both.privacy_text() == "ε 2.91, δ 1e-05; secure aggregation" and both.to_json()["secure_aggregation"]


def test_the_quality_gate_may_require_calibration_and_says_why_it_refused(registry: Registry) -> None:
    gate = QualityGate(tolerance=0.005, calibration_band=0.2)
    overconfident = replace(record("run-a", 0.90), final_metrics={"auc": 0.90, "calibration_slope": 0.6})
    assert registry.register(overconfident, gate=gate).aliases == [CHALLENGER]
    assert registry.audit_entries()[-1]["reason"] == "calibration slope 0.600 outside 1 ± 0.2"
    unknown = replace(record("run-b", 0.90), final_metrics={"auc": 0.90})  # slope undefined: not shown calibrated
    assert registry.register(unknown, gate=gate).aliases == [CHALLENGER]
    calibrated = replace(record("run-c", 0.85), final_metrics={"auc": 0.85, "calibration_slope": 1.1})
    assert registry.register(calibrated, gate=gate).aliases == [CHAMPION]


def test_the_model_report_is_stored_with_the_version_in_strict_json(registry: Registry) -> None:
    report = {"per_hospital": {"hospital-1": {"auc": 0.8, "npv": float("nan")}}, "version": 1}
    version = registry.register(replace(record("run-a", 0.8), report=report, pooled_metrics={"brier": 0.05}),
                                gate=QualityGate()).version
    assert registry.load_report(version) == {"per_hospital": {"hospital-1": {"auc": 0.8, "npv": None}}, "version": 1}
    run = registry.client.get_run(registry.version(version).mlflow_run_id)
    assert run.data.metrics["all_test_rows.brier"] == 0.05
    assert registry.load_report(registry.register(record("run-b", 0.8), gate=QualityGate()).version) is None


def test_the_quality_gate_keeps_a_worse_model_as_challenger(registry: Registry) -> None:
    registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.005))
    near = registry.register(record("run-b", 0.797), gate=QualityGate(tolerance=0.005))  # within tolerance
    worse = registry.register(record("run-c", 0.70), gate=QualityGate(tolerance=0.005))
    assert near.aliases == [CHAMPION]
    assert worse.aliases == [CHALLENGER]
    assert registry.champion() is not None and registry.champion().version == 2
    assert [e["action"] for e in registry.audit_entries()] == ["register", "promote", "register", "promote",
                                                               "register", "challenger"]


def test_promote_and_rollback_are_audited(registry: Registry) -> None:
    registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.0))
    registry.register(record("run-b", 0.70), gate=QualityGate(tolerance=0.0))  # challenger
    assert registry.promote(2, actor="admin").aliases == [CHAMPION]
    assert registry.version(1).aliases == []
    assert registry.rollback(actor="admin").version == 1
    assert registry.champion().version == 1
    entries = registry.audit_entries()
    assert [(e["action"], e["version"], e["actor"]) for e in entries[-2:]] == [("promote", 2, "admin"),
                                                                              ("rollback", 1, "admin")]
    with pytest.raises(RegistryError, match="no version 9"):
        registry.promote(9, actor="admin")


def test_rollback_follows_mlflow_not_the_audit_log(registry: Registry) -> None:
    # champions: v1, v2, then v4; v3 a challenger
    for name, auc in (("run-a", 0.80), ("run-b", 0.81), ("run-c", 0.60), ("run-d", 0.82)):
        registry.register(record(name, auc), gate=QualityGate(tolerance=0.0))
    lines = registry.audit_log.read_text().splitlines()
    # A forger removes the line that made v2 champion and appends one that says v3 was made champion.
    forged = json.loads(next(line for line in lines if '"promote"' in line and '"version": 2' in line))
    lines = [line for line in lines if not ('"promote"' in line and '"version": 2' in line)]
    lines.append(json.dumps({**forged, "version": 3, "seq": len(lines) + 1}))
    registry.audit_log.write_text("\n".join(lines) + "\n")
    assert registry.rollback(actor="admin").version == 2  # the champion before v4, as MLflow recorded it
    assert registry.champion().version == 2
    assert registry.rollback(actor="admin").version == 4  # and back: v3 never was champion


def test_nothing_to_roll_back_is_a_clear_error(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback(actor="admin")
    registry.register(record("run-a", 0.8), gate=QualityGate(tolerance=0.0))
    with pytest.raises(RegistryError, match="only model"):
        registry.rollback(actor="admin")


def test_the_registry_does_not_pull_in_torch() -> None:
    import subprocess

    code = "import sys, health_mlops.registry; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_registering_a_run_again_returns_its_version_and_decides_the_gate_once(registry: Registry) -> None:
    first = registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.005))
    again = registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.005))  # a restarted aggregator, say
    assert again.version == first.version and [v.version for v in registry.versions()] == [1]
    assert [e["action"] for e in registry.audit_entries()] == ["register", "promote"]


def test_a_registration_cut_short_before_the_gate_is_completed_by_the_next(registry: Registry) -> None:
    registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.005))
    run_b = record("run-b", 0.70)
    version = registry._create_version(run_b, registry._log_run(run_b))  # the crash came before the quality gate
    assert registry.version(version).aliases == []
    completed = registry.register(record("run-b", 0.70), gate=QualityGate(tolerance=0.005))
    assert completed.version == version == 2 and completed.aliases == [CHALLENGER]
    assert [v.version for v in registry.versions()] == [1, 2]


def test_a_run_that_trained_as_a_registered_version_did_is_logged_but_adds_no_version(registry: Registry) -> None:
    first = registry.register(replace(record("run-a", 0.80), fingerprint="same"), gate=QualityGate())
    again = registry.register(replace(record("run-b", 0.81), fingerprint="same"), gate=QualityGate())
    assert again.version == first.version == 1 and again.federation_run == "run-a"
    assert [v.version for v in registry.versions()] == [1]
    logged = registry.client.search_runs([registry._experiment_id()], filter_string="tags.federation_run = 'run-b'")
    assert len(logged) == 1 and logged[0].data.tags[SAME_MODEL_AS] == "1"  # its training is still tracked
    assert [(e["action"], e["version"]) for e in registry.audit_entries()] == [("register", 1), ("promote", 1),
                                                                               ("unchanged", 1)]
    # Asked again (an aggregator that restarted before it recorded the answer): the same answer, one run logged.
    assert registry.register(replace(record("run-b", 0.81), fingerprint="same"), gate=QualityGate()).version == 1
    assert len(registry.client.search_runs([registry._experiment_id()],
                                           filter_string="tags.federation_run = 'run-b'")) == 1
    different = registry.register(replace(record("run-c", 0.80), fingerprint="other"), gate=QualityGate())
    unknown = registry.register(record("run-d", 0.80), gate=QualityGate())  # no fingerprint: always a version
    assert (different.version, unknown.version) == (2, 3)


def test_each_audit_line_is_anchored_in_mlflow_and_each_promotion_attested(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            empty_mlflow_db: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = with_empty_mlflow_db(tmp_path, empty_mlflow_db)
    audit = AuditLog(home / "audit.log", bytes(range(32)))
    registry = Registry(home, "health-risk", audit=audit)
    registry.register(record("run-a", 0.80), gate=QualityGate(tolerance=0.0))
    registry.register(record("run-b", 0.70), gate=QualityGate(tolerance=0.0))  # a challenger
    registry.promote(2, actor="admin")
    entries = audit.entries()
    anchors = {a.witness: (a.seq, a.hash) for a in registry.audit_anchors("local")}
    latest = {f"MLflow (health-risk v{e['version']})": (e["seq"], e["hash"]) for e in entries}  # per version
    assert anchors == latest and len(latest) == 2 and entries[-1]["action"] == "promote"
    assert registry.champion_refusal(2) is None and registry.champion_refusal(1) is None
    # Writing the champion straight into MLflow, or copying another version's attestation, is not the registry's
    # audited path: a dashboard holding the audit key refuses it.
    registry.register(record("run-c", 0.60), gate=QualityGate(tolerance=0.0))
    assert "never promoted through the registry" in str(registry.champion_refusal(3))
    copied = registry.client.get_model_version("health-risk", "2").tags[CHAMPION_ATTESTATION]
    registry.client.set_model_version_tag("health-risk", "3", CHAMPION_ATTESTATION, copied)
    assert "does not match the audit key" in str(registry.champion_refusal(3))
    # Another writer's log (a dashboard replica's in Kubernetes): its anchors name it, and only it.
    replica = Registry(home, "health-risk", audit=AuditLog(home / "replica.log", bytes(range(32)), name="dashboard-a"))
    replica.promote(1, actor="ada (dashboard)")
    assert "MLflow (health-risk v1)" not in {a.witness for a in registry.audit_anchors("local")}
    assert [(a.seq, a.witness) for a in registry.audit_anchors("dashboard-a")] == [(1, "MLflow (health-risk v1)")]
    assert registry.champion_refusal(1) is None
