"""What the aggregator tells its operators: metrics, log lines and audit entries, from the coordinator's events
and the service's own outcomes. Nothing here changes state or may break the service."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from health_mlops.fl.messages import weighted_metrics
from health_mlops.fl.state import (Event, ResultAccepted, ResultRejected, RoundClosed, RoundRecord, Run, RunEnded,
                                   RunStarted, RunStatus, TaskKind)
from health_mlops.monitoring import AggregatorMetrics
from health_mlops.trust.audit import AuditLog

log = logging.getLogger("health_mlops.aggregator")


class Reporting:
    def __init__(self, metrics: AggregatorMetrics, audit_log: AuditLog | None, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.audit_log = audit_log
        self.clock = clock

    def audit(self, action: str, actor: str, *, outcome: str = "ok", **details: Any) -> None:
        if self.audit_log is not None:
            self.audit_log.append(action, actor, outcome=outcome, **details)

    def events(self, events: list[Event], runs: Mapping[str, Run]) -> None:
        for event in events:
            match event:
                case RunStarted(run_id=run_id):
                    log.info("%s: started with %s", run_id, ", ".join(runs[run_id].hospitals))
                case RoundClosed(run_id=run_id, record=record):
                    self._round_closed(record)
                    log.info("%s: round %d (%s) closed with %d/%d hospitals in %.3f s", run_id, record.round,
                             record.kind.value, len(record.hospitals), len(runs[run_id].hospitals),
                             record.closed_at - record.opened_at)
                case ResultAccepted(kind=kind):
                    self.result(kind, "accepted")
                case ResultRejected(kind=kind, reason=reason):
                    self.result(kind, "rejected")
                    self.metrics.updates_rejected.labels(reason).inc()
                case RunEnded(run_id=run_id, status=status, reason=reason):
                    self.metrics.runs_ended.labels(status.value).inc()
                    log.info("%s: %s %s", run_id, status.value, reason)
                    self.audit("run_ended", "aggregator", run=run_id, status=status.value, reason=reason)
        self.gauges(runs)

    def result(self, kind: TaskKind, outcome: str) -> None:
        """A result that came in: accepted, rejected (it failed a check), refused (not the sender's to give, or
        too late) or unreadable."""
        self.metrics.results.labels(kind.value, outcome).inc()

    def model_registered(self, run_id: str, outcome: dict[str, Any]) -> None:
        log.info("%s: model %s", run_id, outcome)

    def _round_closed(self, record: RoundRecord) -> None:
        self.metrics.rounds_closed.labels(record.kind.value).inc()
        self.metrics.round_duration.labels(record.kind.value).observe(record.closed_at - record.opened_at)
        self.metrics.round_closed_timestamp.set(self.clock())
        self.metrics.hospitals_reporting.set(len(record.hospitals))
        evaluations = record.evaluations()
        for name, value in weighted_metrics(evaluations).items():
            self.metrics.global_metric.labels(name).set(value)
        for hospital, metadata in evaluations.items():
            for name, defined in metadata.metrics.items():
                if defined is not None:  # names were checked against the allowed metrics when the result came in
                    self.metrics.hospital_metric.labels(hospital, name).set(defined)

    def gauges(self, runs: Mapping[str, Run]) -> None:
        self.metrics.runs_active.set(sum(r.status is RunStatus.running for r in runs.values()))
        if runs:
            newest = list(runs.values())[-1]
            self.metrics.round.set(newest.round)
            self.metrics.hospitals_enrolled.set(len(newest.hospitals))
