"""Local training's settings, apart from the training code so that reading them needs no torch (the serving
image's `start-run` builds a run's configuration from them)."""

from __future__ import annotations

from dataclasses import dataclass

from health_mlops.config import TrainingDefaults
from health_mlops.spec import DatasetSpec

# A model trained on up to this many rows takes `weight_decay` whole, on more a share shrinking as 1 / rows: the
# penalty is a prior of fixed strength, which more rows outweigh. Whole on every model, it underfit large data
# (pooled 5 × 3200 rows: test log loss 0.061, against 0.054 with a tenth of it; a patient with asthma under PM2.5
# above 35 µg/m³ scored 0.37 where the data said 0.69), while small sites (150 rows) and a 3200-row hospital's own
# model (70 events) need all of it (benchmarks/convergence.py).
WEIGHT_DECAY_FULL_ROWS = 4000


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    learning_rate: float
    batch_size: int
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: pull local weights toward the round's global weights
    seed: int = 0
    max_steps: int | None = None  # local steps: stop after this many optimiser steps, epochs or not
    patience: int | None = None  # with validation rows: stop after this many checks without a better loss
    validation_fraction: float = 0.0  # share of each hospital's training rows held out for validation
    prior_rows: int | None = None  # the rows the model learns from in all: a federation's (None: those trained on)

    def weight_decay_for(self, rows: int) -> float:
        """The L2 penalty when training on `rows` rows, of `prior_rows` in all (`WEIGHT_DECAY_FULL_ROWS`)."""
        return self.weight_decay * min(1.0, WEIGHT_DECAY_FULL_ROWS / max(self.prior_rows or rows, 1))

    @classmethod
    def for_task(cls, defaults: TrainingDefaults, spec: DatasetSpec, **overrides: object) -> TrainConfig:
        """Global defaults, then the task's own training hints, then explicit overrides (None = not given).

        The budget is `defaults.steps` optimiser steps, with early stopping on validation rows, unless epochs
        are given (a hint or an override): then exactly that many epochs."""
        values: dict[str, object] = {"epochs": defaults.epochs, "learning_rate": defaults.learning_rate,
                                     "batch_size": defaults.batch_size, "weight_decay": defaults.weight_decay,
                                     "seed": defaults.seed, "max_steps": defaults.steps,
                                     "patience": defaults.patience,
                                     "validation_fraction": defaults.validation_fraction}
        given = {**spec.training.model_dump(exclude_none=True), **{k: v for k, v in overrides.items() if v is not None}}
        if "epochs" in given:
            values["max_steps"] = None
        values.update(given)
        return cls(**values)  # type: ignore[arg-type]
