"""A whole federation in one process, calling the coordinator and the hospitals directly (no HTTP).

For experiments on the core: it exercises exactly the coordinator and hospital logic the services wrap.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import pandas as pd

from health_mlops.data.preprocess import GlobalPreprocessing, Preprocessor, imputation
from health_mlops.data.split import HospitalSplit
from health_mlops.experiments.baselines import ExperimentResult, score_predictions
from health_mlops.ml.directions import weight_constraint
from health_mlops.fl.coordinator import Coordinator
from health_mlops.fl.state import Run, RunStatus
from health_mlops.fl.hospital import HospitalWorker
from health_mlops.fl.stats import reduce_stats
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.strategies import Weights
from health_mlops.ml.evaluate import predict_frame
from health_mlops.ml.initial_weights import initial_weights
from health_mlops.ml.model import model_with_weights
from health_mlops.spec import DatasetSpec


def run_federated_in_memory(spec: DatasetSpec, splits: list[HospitalSplit], config: RunConfig, *,
                            seed: int = 0, worker_overrides: Mapping[str, HospitalWorker] | None = None,
                            probe: pd.DataFrame | None = None) -> tuple[ExperimentResult, Run]:
    """Train federatedly; score the final global model on every hospital's test rows (`probe`: rows it also
    predicts).

    `worker_overrides` stands in for some hospitals' own workers (e.g. the attacker of benchmarks/poisoning.py).
    """
    coordinator = Coordinator(partial(reduce_stats, spec), constrain=weight_constraint(spec))
    workers = {s.hospital_id: HospitalWorker(s.hospital_id, spec, s.train, s.test) for s in splits}
    if unknown := sorted(set(worker_overrides or {}) - set(workers)):
        raise ValueError(f"worker_overrides for hospitals not in the splits: {unknown}")
    workers.update(worker_overrides or {})
    run = coordinator.start_run("simulation", config, list(workers), initial_weights(spec, seed), now=0.0)
    now = 0.0
    while run.status is RunStatus.running:
        for hospital, worker in workers.items():
            task = coordinator.next_task(hospital, "in-memory", now)
            if task is None:
                continue
            result = worker.handle(task.kind, config, run.weights, run.preprocessing, task.round)
            coordinator.submit(task.id, hospital, "in-memory", result, now)
        now += 0.001
    if run.status is not RunStatus.completed:
        raise RuntimeError(f"federated run ended {run.status.value}: {run.reason}")
    assert run.preprocessing is not None  # a completed run closed round 0
    return score_global_model(spec, splits, run.preprocessing, run.weights, probe=probe), run


def score_global_model(spec: DatasetSpec, splits: list[HospitalSplit], preprocessing: GlobalPreprocessing,
                       weights: Weights, *, probe: pd.DataFrame | None = None) -> ExperimentResult:
    """Score a federated model on every hospital's test rows, as the baselines are scored.

    Only an experiment that holds every hospital's data can do this (to compare with pooled training); in a
    real federation the same numbers come back per hospital from the final `evaluate` round.
    """
    preprocessor = Preprocessor.of_run(spec, preprocessing)
    model = model_with_weights(spec.model, len(preprocessor.mean), weights)
    predictions = [predict_frame(model, preprocessor, s.test) for s in splits]
    threshold = preprocessing.decision_threshold
    scores = score_predictions(spec, splits, predictions, [threshold] * len(splits))
    return ExperimentResult("federated", spec.task, spec.primary_metric, *scores,
                            extra={"imputation": imputation(spec, preprocessor.fill),
                                   **({"threshold": threshold} if spec.task == "binary" else {})},
                            probe_predictions=[] if probe is None else [predict_frame(model, preprocessor, probe)])
