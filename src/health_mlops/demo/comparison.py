"""The demo's comparison: the federated model beside pooled and local-only training on the same splits, and the
Bayes-optimal score the synthetic generator knows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from health_mlops.config import Settings, get_training_defaults
from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import read_reference
from health_mlops.experiments.baselines import ProgressHook, run_local, run_pooled
from health_mlops.experiments.simulation import score_global_model
from health_mlops.fl.messages import RunView, decode_weights
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec


def compare_with_baselines(dataset: DatasetSpec, splits: list[HospitalSplit], data: Path, view: RunView,
                           body: bytes, settings: Settings, progress: Callable[[str, int], ProgressHook]
                           ) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Each way of training's results (`ExperimentResult.to_json`, the Bayes-optimal score's where the data has
    one) by column name; and which replicas' results counted for each hospital. `progress(description, models)`
    is the hook a training of that many models reports to."""
    assert view.preprocessing is not None  # the run completed: round 0 closed
    federated = score_global_model(dataset, splits, view.preprocessing, decode_weights(body)[0])
    config = TrainConfig.for_task(get_training_defaults(), dataset)
    pooled = run_pooled(dataset, splits, config, on_progress=progress("pooled training (for comparison)", 1))
    local = run_local(dataset, splits, config,
                      on_progress=progress("local-only training (for comparison)", len(splits)))
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                               stratify=settings.stratified_split)
    columns: dict[str, dict] = {"federated": federated.to_json(), "pooled": pooled.to_json(),
                                "local-only": local.to_json()}
    if reference is not None:
        columns["Bayes-optimal"] = reference
    counted = {h: sorted({r.nodes[h] for r in view.history if h in r.nodes}) for h in view.hospitals}
    return columns, counted
