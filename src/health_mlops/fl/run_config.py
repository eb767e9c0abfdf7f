"""What a federated run is asked to do: its strategy, its privacy budget, its rounds and its limits.

Settings only, validated by pydantic, and light to import: the CLI builds its options and their help from these
models without loading the numerical code that carries them out (`strategies`, `coordinator`, `privacy`);
`federated_run_config` is a task's run, from the same defaults everywhere (CLI, benchmarks, tests).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from health_mlops.config import get_training_defaults
from health_mlops.fl.strategy_table import STRATEGIES, StrategyName, strategy_names
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import DatasetSpec


class ServerOptimiserConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(0.01, gt=0, le=10, description="server step size (eta)")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0, le=1, description="adaptivity: keeps the step finite where the second moment is 0")


class StrategyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: StrategyName = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="share cut from each end (trimmed_mean)")
    proximal_mu: float = Field(0.01, ge=0, le=100, description="hospitals' proximal term (fedprox only)")
    server: ServerOptimiserConfig = ServerOptimiserConfig()

    @field_validator("trim_fraction", "proximal_mu", "server")
    @classmethod
    def _an_option_of_its_strategy(cls, value: object, info: ValidationInfo) -> object:
        # A value other than the default for an option the strategy does not read is a mistake, not a no-op.
        name, option = info.data.get("name"), info.field_name
        assert option is not None
        if name in STRATEGIES and option not in STRATEGIES[name].options and value != cls.model_fields[option].default:
            readers = strategy_names(where=lambda kind: option in kind.options)
            verb = "reads" if len(readers) == 1 else "read"
            raise ValueError(f"only {' and '.join(readers)} {verb} {option}; the strategy is {name}")
        return value


# Past this much noise per clipped gradient, a model of this size learns next to nothing: a privacy budget that
# needs more is refused rather than spent on a useless model (fl/privacy.py plans it).
MAX_NOISE_MULTIPLIER = 10.0


class PrivacyConfig(BaseModel):
    """A run's privacy budget: (ε, δ) for the whole run at each hospital, and how DP-SGD spends it."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    epsilon: float = Field(gt=0, le=100, description="the privacy loss allowed over the whole run")
    delta: float = Field(1e-5, gt=0, lt=1e-2, description="the probability that the ε bound fails")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="each record's gradient is clipped to this norm")
    noise_multiplier: float | None = Field(None, gt=0, le=MAX_NOISE_MULTIPLIER,
                                           description="noise per clipped gradient; default: the least that meets ε")
    sampling_rate: float | None = Field(None, gt=0, lt=1, description="each record's chance to be in a batch: each "
                                        "hospital's batch is this share of its training rows (unset: batch_size)")


class RunConfig(BaseModel):
    """Everything that defines a training run; validated, so a bad value is refused naming its field."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rounds: int = Field(20, ge=1, le=10_000, description="training rounds (fit)")
    local_epochs: int = Field(1, ge=1, le=1000, description="epochs each hospital trains per round")
    local_steps: int | None = Field(None, ge=1, le=1_000_000, description="instead of epochs: optimiser steps each "
                                    "hospital takes per round, whatever its size")
    validation_fraction: float = Field(0.2, ge=0, lt=1, description="share of each hospital's training rows held "
                                       "out to choose the best round (none with differential privacy)")
    learning_rate: float = Field(0.001, gt=0, le=10)
    batch_size: int = Field(64, ge=1, le=1_000_000)
    weight_decay: float = Field(1e-2, ge=0, le=1)
    strategy: StrategyConfig = StrategyConfig()
    min_hospitals: int = Field(2, ge=1, description="results needed to close a round at its deadline")
    round_deadline_s: float = Field(120.0, gt=0, le=7 * 24 * 3600)
    lease_s: float = Field(15.0, ge=1, le=3600, description="a task's lease; heartbeats renew it")
    max_round_retries: int = Field(2, ge=0, le=100)
    update_norm_bound: float = Field(100.0, gt=0, description="an update farther than this (L2) is refused; with "
                                     "secure aggregation, each hospital clips its update to it before masking")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the initial global model")
    privacy: PrivacyConfig | None = Field(None, description="differential privacy (DP-SGD) and its budget")
    secure_aggregation: bool = Field(False, description="the aggregator learns only the sum of the hospitals' "
                                     "updates (masked, Bonawitz et al. 2017); weighted strategies only")
    secure_phase_s: float = Field(60.0, gt=0, le=3600, description="with secure aggregation: how long its key, share "
                                  "and reveal exchanges wait for slow hospitals")
    secure_colluding_hospitals: int = Field(0, ge=0, le=1000, description="with secure aggregation: how many "
                                            "hospitals may collude with the aggregator (one that runs it, say) and "
                                            "still no update be exposed; raises the threshold to (n + c) // 2 + 1 "
                                            "of n hospitals, so fewer dropouts are survived")

    @model_validator(mode="before")
    @classmethod
    def _no_validation_rows_under_privacy(cls, values: Any) -> Any:
        # Choosing a round by validation loss would spend privacy DP-SGD's accounting does not count; a private
        # run trains on all its rows and keeps its last round.
        if isinstance(values, dict) and values.get("privacy") is not None and "validation_fraction" not in values:
            return {**values, "validation_fraction": 0.0}
        return values

    @model_validator(mode="after")
    def _privacy_with_a_private_strategy(self) -> RunConfig:
        if self.privacy is not None and not STRATEGIES[self.strategy.name].with_differential_privacy:
            private = strategy_names(where=lambda kind: kind.with_differential_privacy)
            raise ValueError(f"privacy: {self.strategy.name} trains with FedProx's proximal term, which acts on the "
                             f"weights outside DP-SGD's per-record gradients, so it is not private; use one of "
                             f"{', '.join(private)}")
        if self.privacy is not None and self.validation_fraction > 0:
            raise ValueError("privacy: choosing the best round on validation rows would spend privacy the budget "
                             "does not count; validation_fraction must be 0 with differential privacy")
        if self.privacy is not None and self.local_steps is not None:
            raise ValueError("privacy: the privacy budget is planned in local epochs; local_steps cannot be used "
                             "with differential privacy")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_of_a_sum(self) -> RunConfig:
        if self.secure_aggregation and not STRATEGIES[self.strategy.name].with_secure_aggregation:
            summable = strategy_names(where=lambda kind: kind.with_secure_aggregation)
            raise ValueError(f"secure_aggregation: the aggregator sees only the sum of the updates, and "
                             f"{self.strategy.name} needs each hospital's update; use one of {', '.join(summable)}")
        if self.secure_colluding_hospitals and not self.secure_aggregation:
            raise ValueError("secure_colluding_hospitals: applies to secure aggregation, which is off")
        return self

    @model_validator(mode="after")
    def _deadline_outlasts_a_lease(self) -> RunConfig:
        if self.round_deadline_s <= self.lease_s:
            raise ValueError(f"round_deadline_s ({self.round_deadline_s:g}) must exceed lease_s ({self.lease_s:g}), "
                             "or a lost replica's task could never be taken over within the round")
        return self

    def batch_size_at(self, rows: int) -> int:
        """The batch of a hospital training on `rows` rows: with a DP sampling rate, that share of its rows (at
        least one), so that a small site samples, and spends its budget, as a large one does; else `batch_size`."""
        rate = None if self.privacy is None else self.privacy.sampling_rate
        return self.batch_size if rate is None else max(1, round(rate * rows))


def federated_run_config(dataset: DatasetSpec, hospitals: int, **overrides: object) -> RunConfig:
    """A run over `hospitals` hospitals with the task's training settings (`TrainingDefaults`, then the spec's
    hints); `overrides` that are None are not given. `strategy` is a strategy's name; `proximal_mu`,
    `trim_fraction` and `server_learning_rate` go into its config.

    Each hospital takes `local_steps` optimiser steps a round (`TrainingDefaults.local_steps`), whatever its
    size, unless epochs are asked for: `local_epochs`, or the spec's `training.epochs` (passes over the data a
    model of the task needs) spread over the rounds, ceil(epochs / rounds) a round; and a private run, whose
    budget is planned in epochs (one a round unless given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    defaults = get_training_defaults()
    if (privacy := given.get("privacy")) is not None:  # DP-SGD's own defaults, unless given
        given = {"learning_rate": defaults.dp_learning_rate, **given}
        privacy = privacy if isinstance(privacy, PrivacyConfig) else PrivacyConfig.model_validate(privacy)
        if "batch_size" not in given and privacy.sampling_rate is None:
            given["privacy"] = privacy.model_copy(update={"sampling_rate": defaults.dp_sampling_rate})
    local = TrainConfig.for_task(defaults, dataset, learning_rate=given.pop("learning_rate", None),
                                 batch_size=given.pop("batch_size", None), weight_decay=given.pop("weight_decay", None))
    if "local_epochs" not in given and dataset.training.epochs is not None:
        rounds = int(given.get("rounds", RunConfig.model_fields["rounds"].default))  # type: ignore[call-overload]
        given["local_epochs"] = -(-dataset.training.epochs // rounds)
    if "local_epochs" not in given and given.get("privacy") is None:
        given.setdefault("local_steps", defaults.local_steps)
    if given.get("privacy") is None:
        given.setdefault("validation_fraction", defaults.validation_fraction)
    strategy: dict[str, object] = {"name": given.pop("strategy", "fedavg")}
    for option in ("proximal_mu", "trim_fraction"):
        if option in given:
            strategy[option] = given.pop(option)
    if "server_learning_rate" in given:
        strategy["server"] = ServerOptimiserConfig(learning_rate=given.pop("server_learning_rate"))
    return RunConfig(learning_rate=local.learning_rate, batch_size=local.batch_size, weight_decay=local.weight_decay,
                     min_hospitals=hospitals, strategy=StrategyConfig(**strategy), **given)
