"""A federated run's state, as the coordinator keeps it and the messages carry it: runs, rounds, tasks, their
results, and the events the coordinator reports. Types only: whoever reads a run (the node, the dashboard, the
report) imports these without the coordinator's logic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from health_mlops.data.preprocess import GlobalPreprocessing
from health_mlops.fl.metadata import EvaluationMetadata, ResultMetadata, StatsMetadata
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.strategies import ServerOptimiserState, Weights


class TaskKind(str, Enum):
    stats = "stats"
    fit = "fit"
    evaluate = "evaluate"


class RunStatus(str, Enum):
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


class TaskStatus(str, Enum):
    pending = "pending"
    leased = "leased"
    done = "done"
    rejected = "rejected"
    abandoned = "abandoned"  # its round closed or was retried without it


# A task's id, `<run>.r<round>.a<attempt>.<hospital>` (`task_id_of`): whose task it was and which round, read
# back when a late answer names a task the coordinator has forgotten (`Coordinator.unknown_task`).
TASK_ID = re.compile(r"(?P<run>.+)\.r(?P<round>\d+)\.a(?P<attempt>\d+)\.(?P<hospital>[^.]+)")


def task_id_of(run_id: str, round_number: int, attempt: int, hospital: str) -> str:
    return f"{run_id}.r{round_number}.a{attempt}.{hospital}"


@dataclass
class Task:
    id: str
    run_id: str
    round: int
    attempt: int
    kind: TaskKind
    hospital: str
    status: TaskStatus = TaskStatus.pending
    holder: str | None = None
    lease_expires: float = 0.0


@dataclass
class TaskResult:
    """What a hospital sends back: metrics and counts as JSON (`fl.metadata` says what is allowed), tensors (fit
    only) by name. `reference` names where the service keeps the result durably (its own file), so that a
    snapshot holds no tensors."""

    metadata: dict[str, Any]
    tensors: Weights = field(default_factory=dict)
    reference: str = ""


@dataclass
class AcceptedResult:
    """A result the coordinator accepted: its metadata as checked, and the tensors it still needs (see `_accept`)."""

    metadata: ResultMetadata
    tensors: Weights
    reference: str


@dataclass
class RoundRecord:
    round: int
    kind: TaskKind
    hospitals: dict[str, ResultMetadata]  # hospital -> its result's metadata (metrics, examples, counts)
    nodes: dict[str, str]  # hospital -> the replica whose result counted
    opened_at: float  # when the attempt that closed the round opened
    closed_at: float
    attempts: int
    # A securely aggregated round: who took part in each phase (the aggregator saw the sum of "masked" only)
    secure_aggregation: dict[str, Any] | None = None

    def stats(self) -> dict[str, StatsMetadata]:
        """Round 0's counts, by hospital (empty for any other round)."""
        return {h: m for h, m in self.hospitals.items() if isinstance(m, StatsMetadata)}

    def evaluations(self) -> dict[str, EvaluationMetadata]:
        """Each hospital's evaluation of the model entering this round (empty for round 0)."""
        return {h: m for h, m in self.hospitals.items() if isinstance(m, EvaluationMetadata)}


def validation_loss(hospitals: Mapping[str, ResultMetadata]) -> float | None:
    """The model's mean loss over every hospital's validation rows (from their sums and counts); None without any."""
    evaluations = [m for m in hospitals.values() if isinstance(m, EvaluationMetadata) and m.validation_rows > 0]
    rows = sum(m.validation_rows for m in evaluations)
    return sum(m.validation_loss_sum for m in evaluations) / rows if rows else None


@dataclass
class Run:
    id: str
    config: RunConfig
    hospitals: list[str]
    status: RunStatus = RunStatus.running
    reason: str = ""
    round: int = 0
    attempt: int = 0
    started_at: float = 0.0
    round_opened_at: float = 0.0
    round_deadline: float = 0.0
    weights: Weights = field(default_factory=dict)
    optimiser: ServerOptimiserState = ServerOptimiserState()
    preprocessing: GlobalPreprocessing | None = None  # from round 0's stats
    example_limits: dict[str, int] = field(default_factory=dict)  # hospital -> training rows it counted in round 0
    excluded: dict[str, str] = field(default_factory=dict)  # hospital -> why it was left out of the run
    history: list[RoundRecord] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    # The model with the least validation loss over all hospitals so far: the round it entered, its loss, its
    # weights. When it is not the last model, one more evaluate round scores it, and it is the run's model.
    best_round: int | None = None
    best_loss: float = math.inf
    best_weights: Weights = field(default_factory=dict)
    reevaluate: bool = False

    @property
    def final_round(self) -> int:
        return self.config.rounds + (2 if self.reevaluate else 1)

    @property
    def selected_round(self) -> int:
        """The round whose entering model is the run's: the best validated, else the last."""
        return self.best_round if self.reevaluate and self.best_round is not None else self.config.rounds + 1

    def kind_of(self, round_number: int) -> TaskKind:
        if round_number == 0:
            return TaskKind.stats
        return TaskKind.evaluate if round_number > self.config.rounds else TaskKind.fit


@dataclass(frozen=True)
class RunStarted:
    run_id: str


@dataclass(frozen=True)
class RoundOpened:
    run_id: str
    round: int
    attempt: int


@dataclass(frozen=True)
class RoundClosed:
    run_id: str
    record: RoundRecord


@dataclass(frozen=True)
class RunEnded:
    run_id: str
    status: RunStatus
    reason: str


@dataclass(frozen=True)
class ResultAccepted:
    run_id: str
    task_id: str
    kind: TaskKind


@dataclass(frozen=True)
class ResultRejected:
    run_id: str
    task_id: str
    kind: TaskKind
    reason: str


Event = RunStarted | RoundOpened | RoundClosed | RunEnded | ResultAccepted | ResultRejected
