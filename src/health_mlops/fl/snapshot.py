"""A coordinator's durable state as JSON-able records (a run without its arrays, a closed round), and what a
restore reads beside them.

`Coordinator.snapshot()` keeps the running runs but their arrays and closed rounds, which the service keeps in
files of their own (`fl.store.CheckpointStore`), as it keeps the ended runs' records; `Coordinator.restore()` reads
them back through a `SavedState`, which the store is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.metadata import check_metadata
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.state import RoundRecord, Run, RunStatus, Task, TaskKind
from health_mlops.fl.strategies import ServerOptimiserState, Weights


class SavedState(Protocol):
    """What restoring a coordinator reads beside its snapshot, from where the service keeps it."""

    def round_arrays(self, run_id: str, round_number: int) -> tuple[Weights, Weights, Weights]:
        """A running run's weights and server optimiser moments (first, second) entering that round."""

    def round_history(self, run_id: str, rounds: int) -> Sequence[Mapping[str, Any]]:
        """A running run's first `rounds` closed rounds' records (`round_record_to_dict`), in order."""

    def result_tensors(self, task: Task, reference: str) -> Weights:
        """The tensors of an accepted fit result, kept under `reference`."""

    def ended_runs(self) -> Iterable[Mapping[str, Any]]:
        """Every ended run's record (`Coordinator.run_record`)."""


def as_sent(weights: Mapping[str, np.ndarray]) -> Weights:
    """The global weights as hospitals receive them and the service keeps them (float32, the model's own
    precision): aggregated in float64, kept as sent, so a restored run continues from exactly its weights."""
    return {name: np.asarray(tensor, dtype=np.float32) for name, tensor in weights.items()}


def round_record_to_dict(record: RoundRecord) -> dict[str, Any]:
    return {**vars(record), "kind": record.kind.value,
            "hospitals": {h: m.model_dump(mode="json") for h, m in record.hospitals.items()}}


def round_record_from_dict(raw: Mapping[str, Any]) -> RoundRecord:
    """A record `round_record_to_dict` wrote; its metadata was checked when accepted and is checked again."""
    kind = TaskKind(raw["kind"])
    hospitals = {h: check_metadata(kind.value, m, columns=None) for h, m in raw["hospitals"].items()}
    return RoundRecord(**{**raw, "kind": kind, "hospitals": hospitals})


def run_to_dict(run: Run, *, with_history: bool) -> dict[str, Any]:
    """A run's state but its arrays (weights, server optimiser moments), which the service keeps per round, and
    unless `with_history` its closed rounds' records (which it keeps in a file of their own) but their number."""
    history: dict[str, Any] = ({"history": [round_record_to_dict(h) for h in run.history]} if with_history
                               else {"history_length": len(run.history)})
    return {
        "id": run.id, "config": run.config.model_dump(), "hospitals": run.hospitals, "status": run.status.value,
        "reason": run.reason, "round": run.round, "attempt": run.attempt, "started_at": run.started_at,
        "round_opened_at": run.round_opened_at,
        "round_deadline": run.round_deadline,
        "preprocessing": None if run.preprocessing is None else run.preprocessing.model_dump(mode="json"),
        "rejected": dict(run.rejected),
        "example_limits": dict(run.example_limits), "excluded": dict(run.excluded),
        "optimiser_steps": run.optimiser.steps, "best_round": run.best_round,
        "best_loss": None if run.best_round is None else run.best_loss, "reevaluate": run.reevaluate, **history,
    }


def run_from_dict(raw: Mapping[str, Any], saved: SavedState) -> Run:
    """A run `run_to_dict` wrote: an ended one (its history in the record) without arrays; a running one with its
    arrays and closed rounds read from `saved`."""
    status = RunStatus(raw["status"])
    if status is RunStatus.running:
        weights, first_moment, second_moment = saved.round_arrays(raw["id"], raw["round"])
    else:
        weights, first_moment, second_moment = {}, {}, {}
    best_round = raw.get("best_round")
    records = raw["history"] if "history" in raw else saved.round_history(raw["id"], raw["history_length"])
    return Run(
        id=raw["id"], config=RunConfig.model_validate(raw["config"]), hospitals=list(raw["hospitals"]),
        status=status, reason=raw["reason"], round=raw["round"], attempt=raw["attempt"],
        started_at=raw.get("started_at", 0.0),
        round_opened_at=raw["round_opened_at"], round_deadline=raw["round_deadline"], weights=as_sent(weights),
        optimiser=ServerOptimiserState(first_moment, second_moment, raw["optimiser_steps"]),
        # Runs saved before preprocessing was typed kept an empty dict until round 0 closed.
        preprocessing=GlobalPreprocessing.model_validate(raw["preprocessing"]) if raw["preprocessing"] else None,
        rejected=dict(raw["rejected"]), example_limits=dict(raw["example_limits"]),
        excluded=dict(raw.get("excluded", {})), history=[round_record_from_dict(h) for h in records],
        best_round=best_round, best_loss=math.inf if best_round is None else float(raw["best_loss"]),
        best_weights={} if best_round is None or status is not RunStatus.running
        else as_sent(saved.round_arrays(raw["id"], best_round)[0]),
        reevaluate=bool(raw.get("reevaluate", False)))
