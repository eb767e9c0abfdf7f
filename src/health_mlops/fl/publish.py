"""From a completed run to a registered model: the federated evaluation as its metrics and its model report, the
global weights exported to ONNX with the run's preprocessing inside, and the registry's quality gate.

Registration talks to MLflow (a database, possibly a server), so the aggregator runs it in a worker thread;
its outcome is written beside the run's checkpoints, so a restarted aggregator registers what it had not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from health_mlops import __version__
from health_mlops.errors import CheckpointError
from health_mlops.fl.messages import decode_weights, weighted_metrics
from health_mlops.fl.privacy_budget import privacy_report
from health_mlops.fl.report import model_report
from health_mlops.fl.state import Run, TaskKind
from health_mlops.fl.store import CheckpointStore
from health_mlops.fl.strategies import Weights
from health_mlops.ml.onnx import export_onnx
from health_mlops.ml.site_calibration import SiteCalibration
from health_mlops.registry import QualityGate, Registry, TrainingRecord
from health_mlops.spec import DatasetSpec, spec_to_yaml
from health_mlops.system.faults import crash_point


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def training_fingerprint(run: Run, spec_yaml: str) -> str:
    """A digest of what decided a completed run's model: the code's version, the task, the run's settings (the
    seed of its initial model among them), each hospital's training data as round 0 counted it, and which
    hospitals counted in each round. Two runs with the same fingerprint trained the same model, up to the order
    the hospitals' updates were summed in: the registry keeps one version of it."""
    content = {"code": __version__, "spec": spec_yaml, "config": run.config.model_dump(mode="json"),
               "data": {h: m.model_dump(mode="json", exclude={"compute_seconds"})
                        for r in run.history for h, m in sorted(r.stats().items())},
               "rounds": [sorted(r.hospitals) for r in run.history]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def site_calibrations(run: Run, spec: DatasetSpec) -> dict[str, SiteCalibration]:
    """Each hospital's recalibration of the run's model, with its decision threshold: its own event rate (from
    its round-0 counts), as the hospital flagged its calibrated test rows."""
    stats = next((r.stats() for r in run.history if r.kind is TaskKind.stats), {})
    final = [r for r in run.history if r.kind is TaskKind.evaluate][-1].evaluations()
    return {hospital: SiteCalibration(**m.site_calibration.model_dump(),
                                      threshold=spec.threshold_for(stats[hospital].target_sum / stats[hospital].count))
            for hospital, m in final.items() if m.site_calibration is not None and hospital in stats
            and stats[hospital].count > 0}


def training_record(run: Run, spec: DatasetSpec, weights: Weights) -> TrainingRecord:
    """What the registry keeps of a completed run. Step r holds the metrics of the model entering round r
    (each round evaluates the incoming model first); the final `evaluate` round scores the final model."""
    evaluated = [r for r in run.history if r.kind is not TaskKind.stats]
    if run.preprocessing is None:
        raise ValueError(f"{run.id} has no preprocessing: round 0 never closed")
    privacy = privacy_report(run)
    report = model_report(run, spec)
    spec_yaml = spec_to_yaml(spec)
    return TrainingRecord(
        federation_run=run.id, params={**run.config.model_dump(), "hospitals": ",".join(run.hospitals)},
        round_metrics=[(r.round, weighted_metrics(r.evaluations())) for r in evaluated],
        hospital_metrics=[(r.round, hospital, _numbers(metadata.metrics))
                          for r in evaluated for hospital, metadata in r.evaluations().items()],
        # The model's metrics are the mean over hospitals (each hospital counts once, as the field reports)
        final_metrics=_numbers(report["mean_over_hospitals"]), metric_name=spec.primary_metric,
        pooled_metrics=_numbers(report.get("all_test_rows") or {}), report=report,
        onnx_model=export_onnx(spec, run.preprocessing, weights, sites=site_calibrations(run, spec)),
        spec_yaml=spec_yaml,
        fingerprint=training_fingerprint(run, spec_yaml), secure_aggregation=run.config.secure_aggregation,
        privacy=None if privacy is None else {"epsilon": privacy["epsilon"], "delta": privacy["delta"]},
        hospital_epsilons=None if privacy is None else {h: p["epsilon"] for h, p in privacy["hospitals"].items()})


class Publisher:
    def __init__(self, registry_factory: Callable[[], Registry], store: CheckpointStore, gate: QualityGate) -> None:
        self._registry_factory = registry_factory
        self._registry: Registry | None = None
        self._store = store
        self.gate = gate

    def publish(self, run: Run, spec: DatasetSpec) -> dict[str, Any]:
        """Export and register a completed run's model (in a worker thread); the outcome is kept with the run.
        The final weights are read from the run's last round's file (an ended run keeps no arrays in memory)."""
        try:
            body = self._store.load_weights(run.id, run.round)
            if body is None:
                raise CheckpointError(f"{self._store.weights_path(run.id, run.round)}: the final weights are missing")
            record = training_record(run, spec, decode_weights(body)[0])
            if self._registry is None:
                self._registry = self._registry_factory()
            version = self._registry.register(record, gate=self.gate)
            crash_point("model_registered_unrecorded")
            # "unchanged": this run trained the same model as the version's own run (see `training_fingerprint`)
            status = "registered" if version.federation_run == run.id else "unchanged"
            outcome: dict[str, Any] = {"status": status, **version.to_json()}
        except Exception as error:  # noqa: BLE001 - any registry failure is reported on the run, not raised
            outcome = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
        self._store.save_registration(run.id, outcome)
        return outcome
