"""The demo's comparison: the federated model beside pooled and local-only training on the same splits, and the
Bayes-optimal score the synthetic generator knows; on each hospital's test split, and on its independent cohort of
later patient-days (`experiments.cohort`), where the intervals are narrow enough to tell the models apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from health_mlops.config import Settings, get_training_defaults
from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import generate_cohort, generator_of, read_reference
from health_mlops.experiments.baselines import ProgressHook, run_local, run_pooled
from health_mlops.experiments.cohort import cohort_rows_of, score_on_cohort
from health_mlops.experiments.simulation import score_global_model
from health_mlops.fl.messages import RunView, decode_weights
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec


def compare_with_baselines(dataset: DatasetSpec, splits: list[HospitalSplit], data: Path, view: RunView,
                           body: bytes, settings: Settings, progress: Callable[[str, int], ProgressHook]
                           ) -> tuple[dict[str, dict], dict[str, list[str]], dict[str, object] | None]:
    """Each way of training's results on the test splits (`ExperimentResult.to_json`, the Bayes-optimal score's
    where the data has one) by column name; which replicas' results counted for each hospital; and for generated
    data, every model on each hospital's cohort (`CohortScores.to_json`). `progress(description, models)` is the
    hook a training of that many models reports to."""
    assert view.preprocessing is not None  # the run completed: round 0 closed
    generator = generator_of(data)
    cohort = None if generator is None else generate_cohort(n_hospitals=len(generator[1]), seed=generator[0])
    probe = None if cohort is None else cohort_rows_of(cohort)
    federated = score_global_model(dataset, splits, view.preprocessing, decode_weights(body)[0], probe=probe)
    config = TrainConfig.for_task(get_training_defaults(), dataset)
    pooled = run_pooled(dataset, splits, config, on_progress=progress("pooled training (for comparison)", 1),
                        probe=probe)
    local = run_local(dataset, splits, config,
                      on_progress=progress("local-only training (for comparison)", len(splits)), probe=probe)
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                               stratify=settings.stratified_split)
    columns: dict[str, dict] = {"federated": federated.to_json(), "pooled": pooled.to_json(),
                                "local-only": local.to_json()}
    if reference is not None:
        columns["Bayes-optimal"] = reference
    counted = {h: sorted({r.nodes[h] for r in view.history if h in r.nodes}) for h in view.hospitals}
    scored = None
    if cohort is not None and generator is not None:
        scored = score_on_cohort(cohort, dict(zip(cohort, generator[1], strict=True)), dataset.target.name,
                                 federated=federated.probe_predictions[0], pooled=pooled.probe_predictions[0],
                                 local=local.probe_predictions).to_json()
    return columns, counted, scored
