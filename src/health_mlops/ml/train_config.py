"""Local training's settings, apart from the training code so that reading them needs no torch (the serving
image's `start-run` builds a run's configuration from them)."""

from __future__ import annotations

from dataclasses import dataclass

from health_mlops.config import TrainingDefaults
from health_mlops.spec import DatasetSpec


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    learning_rate: float
    batch_size: int
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: pull local weights toward the round's global weights
    seed: int = 0
    max_steps: int | None = None  # local steps: stop after this many optimiser steps, epochs or not

    @classmethod
    def for_task(cls, defaults: TrainingDefaults, spec: DatasetSpec, **overrides: object) -> TrainConfig:
        """Global defaults, then the task's own training hints, then explicit overrides (None = not given)."""
        values: dict[str, object] = {"epochs": defaults.epochs, "learning_rate": defaults.learning_rate,
                                     "batch_size": defaults.batch_size, "weight_decay": defaults.weight_decay,
                                     "seed": defaults.seed}
        values.update(spec.training.model_dump(exclude_none=True))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
