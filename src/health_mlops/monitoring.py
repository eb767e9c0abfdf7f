"""Every Prometheus metric the project exposes: the one place their names, units and labels are defined.

Names follow Prometheus' guide: prefixed `health_mlops_`, unit in the name, `_total` for counters, and
only low-cardinality labels (hospital, kind, outcome, reason, metric). Each service builds its metrics on
its own registry, so several services can live in one process (the loopback federation, tests) without
clashing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Round and task durations range from milliseconds (tiny models) to many minutes (large hospitals).
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


def auth_failures(registry: CollectorRegistry) -> Counter:
    return Counter("health_mlops_auth_failures_total",
                   "Requests refused for their credential: 401 none or unknown, 403 not allowed", ["status"],
                   registry=registry)


class AggregatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.round = Gauge("health_mlops_federation_round", "Round the newest run is in (0 = stats)", registry=r)
        self.runs_active = Gauge("health_mlops_runs_active", "Runs in progress", registry=r)
        self.runs_ended = Counter("health_mlops_runs_ended_total", "Runs that ended, by status", ["status"],
                                  registry=r)
        self.rounds_closed = Counter("health_mlops_rounds_closed_total", "Rounds closed, by kind", ["kind"],
                                     registry=r)
        self.round_duration = Histogram("health_mlops_round_duration_seconds",
                                        "Wall time from a round's opening to its closing", ["kind"],
                                        buckets=_DURATION_BUCKETS, registry=r)
        self.round_closed_timestamp = Gauge("health_mlops_round_last_closed_timestamp_seconds",
                                            "Unix time the last round closed", registry=r)
        self.hospitals_reporting = Gauge("health_mlops_hospitals_reporting",
                                         "Hospitals whose result counted in the last closed round", registry=r)
        self.hospitals_enrolled = Gauge("health_mlops_hospitals_enrolled", "Hospitals in the newest run",
                                        registry=r)
        self.global_metric = Gauge("health_mlops_global_model_metric",
                                   "Federated evaluation of the global model (example-weighted over hospitals)",
                                   ["metric"], registry=r)
        self.hospital_metric = Gauge("health_mlops_hospital_model_metric",
                                     "The global model evaluated on one hospital's test split",
                                     ["hospital", "metric"], registry=r)
        self.results = Counter("health_mlops_task_results_total", "Task results received, by kind and outcome",
                               ["kind", "outcome"], registry=r)
        self.updates_rejected = Counter("health_mlops_updates_rejected_total", "Model updates refused, by reason",
                                        ["reason"], registry=r)
        self.checkpoint_duration = Histogram("health_mlops_checkpoint_duration_seconds",
                                             "Time to write a checkpoint durably", buckets=_DURATION_BUCKETS,
                                             registry=r)
        self.checkpoint_bytes = Counter("health_mlops_checkpoint_bytes_total",
                                        "Bytes written durably, by file (state, result, weights, optimiser, "
                                        "history, run)",
                                        ["file"], registry=r)
        self.auth_failures = auth_failures(r)
        self.audit_sequence = Gauge("health_mlops_audit_log_sequence", "Sequence number of the audit log's last "
                                    "line (Prometheus keeps its history: a log cut short shows as a fall)",
                                    registry=r)
        self.handshakes_refused = Counter("health_mlops_tls_handshakes_refused_total", "Connections to the API "
                                          "refused in the TLS handshake, by reason (revoked, expired, untrusted, no "
                                          "certificate, other): they reach nothing of the application",
                                          ["reason"], registry=r)


class NodeMetrics:
    def __init__(self, hospital: str, node: str, city: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.hospital = hospital
        r = self.registry
        Info("health_mlops_node", "This hospital node", registry=r).info(
            {"hospital": hospital, "node": node, "city": city})
        self.tasks = Counter("health_mlops_node_tasks_total", "Tasks this node worked on, by kind and outcome",
                             ["hospital", "kind", "outcome"], registry=r)
        self.task_duration = Histogram("health_mlops_node_task_duration_seconds",
                                       "Local compute per task", ["hospital", "kind"], buckets=_DURATION_BUCKETS,
                                       registry=r)
        self.data_rows = Gauge("health_mlops_data_rows", "Rows of the hospital's data, by validation status",
                               ["hospital", "status"], registry=r)
        self.central_reachable = Gauge("health_mlops_node_central_reachable",
                                       "1 if the last call to the aggregator got an answer", ["hospital"],
                                       registry=r)
        self.last_task_timestamp = Gauge("health_mlops_node_last_task_timestamp_seconds",
                                         "Unix time this node last finished a task", ["hospital"], registry=r)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.auth_failures = auth_failures(r)
        self.predictions = Counter("health_mlops_predictions_total", "Prediction requests, by endpoint and outcome",
                                   ["endpoint", "outcome"], registry=r)
        self.rows = Counter("health_mlops_predicted_rows_total", "Rows predicted through the batch endpoint",
                            registry=r)
        self.invalid_rows = Counter("health_mlops_prediction_rows_invalid_total", "Rows refused as not what the "
                                    "spec allows (a client's input, not a server error), by endpoint", ["endpoint"],
                                    registry=r)
        self.latency = Histogram("health_mlops_prediction_latency_seconds", "Time to answer a prediction request",
                                 ["endpoint"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                        0.5, 1, 2.5, 5), registry=r)
        self.model_version = Gauge("health_mlops_model_version", "Version of the model being served", registry=r)
        self.drift = Gauge("health_mlops_feature_drift_score", "Population stability index of a feature: recently "
                           "scored rows against the champion's training population", ["feature"], registry=r)
        self.drift_rows = Gauge("health_mlops_drift_window_rows", "Rows the drift scores are computed over",
                                registry=r)
        self.logins = Counter("health_mlops_dashboard_logins_total", "Dashboard logins by outcome: ok, refused "
                              "(wrong name or password)", ["outcome"], registry=r)
        self.sessions = Gauge("health_mlops_dashboard_sessions", "Live dashboard sessions in this replica",
                              registry=r)


def histogram_quantile(histogram: Histogram, quantile: float, **labels: str) -> float | None:
    """The upper bound of the bucket holding the `quantile` of a histogram's observations (as Prometheus'
    histogram_quantile would bound it); None before any observation."""
    buckets = sorted((float(s.labels["le"]), s.value) for metric in histogram.collect() for s in metric.samples
                      if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items()))
    total = buckets[-1][1] if buckets else 0.0
    if total == 0:
        return None
    return next(bound for bound, count in buckets if count >= quantile * total)
