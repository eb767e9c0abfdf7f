"""Options shared by several commands, and how they become a run's configuration. Their choices and defaults
are read from where they are defined (the spec's model kinds, the strategies, the run's and training's
defaults), so `--help` says what the code does."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, get_args

import typer
from pydantic import ValidationError

from health_mlops.cli.output import fail
from health_mlops.config import TrainingDefaults
from health_mlops.fl.run_config import (PrivacyConfig, RunConfig, ServerOptimiserConfig, StrategyConfig,
                                        federated_run_config)
from health_mlops.fl.strategy_table import STRATEGIES, strategy_names
from health_mlops.spec import DatasetSpec, ModelDefaults


class Mode(str, Enum):
    pooled = "pooled"
    local = "local"
    federated = "federated"


TRAINING = TrainingDefaults.model_fields
RUN = RunConfig.model_fields
STRATEGY = StrategyConfig.model_fields
SERVER_OPTIMISER = ServerOptimiserConfig.model_fields

# The model kinds are the spec's: one list.
ModelKind = Enum("ModelKind",  # type: ignore[misc]
                 {kind: kind for kind in get_args(ModelDefaults.model_fields["kind"].annotation)}, type=str)

# The CLI's choices are the strategies' names: one table, so a new strategy appears here by itself.
Strategy = Enum("Strategy", {name: name for name in STRATEGIES}, type=str)  # type: ignore[misc]

SpecOption = Annotated[str | None, typer.Option(help="built-in spec name or YAML path")]
AdminTokenOption = Annotated[Path | None, typer.Option(
    help="the admin token (default: env HEALTH_MLOPS_ADMIN_TOKEN, else <credentials>/admin.token)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON")]

# Differential privacy, the same four options on every command that starts a federated run.
DpEpsilon = Annotated[float | None, typer.Option(
    "--dp-epsilon", help="train with differential privacy (DP-SGD at every hospital): the ε each hospital may "
                         "spend over the whole run; a budget that cannot be met is refused before training")]
DpDelta = Annotated[float, typer.Option("--dp-delta", help="with --dp-epsilon: the δ of the (ε, δ) guarantee")]
DpNoise = Annotated[float | None, typer.Option(
    "--dp-noise-multiplier", help="with --dp-epsilon: noise per clipped gradient (default: the least that meets ε)")]
DpClip = Annotated[float, typer.Option("--dp-max-grad-norm",
                                       help="with --dp-epsilon: each record's gradient is clipped to this norm")]
SecureAggregation = Annotated[bool, typer.Option(
    "--secure-aggregation", help=f"the aggregator learns only the sum of the hospitals' updates (masked; weighted "
                                 f"strategies: {', '.join(strategy_names(where=lambda kind: kind.weighted))})")]
SecureColluding = Annotated[int, typer.Option(
    "--secure-colluding-hospitals", min=0, max=1000,
    help="with --secure-aggregation: how many hospitals may collude with the aggregator (one that runs it, say) and "
         "still no update be exposed; raises the unmasking threshold, so fewer dropouts are survived")]
# A run-config field a refusal names -> the option that sets it.
OPTION_OF_FIELD = {"epsilon": "--dp-epsilon", "delta": "--dp-delta", "noise_multiplier": "--dp-noise-multiplier",
                   "max_grad_norm": "--dp-max-grad-norm", "proximal_mu": "--proximal-mu",
                   "trim_fraction": "--trim-fraction", "server": "--server-learning-rate",
                   "server.learning_rate": "--server-learning-rate"}


def with_model(dataset: DatasetSpec, kind: Enum | None, hidden: str | None) -> DatasetSpec:
    """The spec with the model asked for on the command line (a bad --hidden ends the command, exit 2)."""
    if kind is None and hidden is None:
        return dataset
    model = dataset.model.model_copy(update={"kind": kind.value} if kind is not None else {})
    if hidden is not None:
        try:
            widths = tuple(int(width) for width in hidden.split(","))
        except ValueError:
            widths = ()
        if not widths or min(widths) < 1:
            fail(f"--hidden: {hidden!r} is not a list of layer widths like 64,32")
        model = model.model_copy(update={"hidden": widths})
    return dataset.model_copy(update={"model": model})


def run_config_from_options(dataset: DatasetSpec, hospitals: int, *, epsilon: float | None, delta: float,
                            noise_multiplier: float | None, max_grad_norm: float, **overrides: object) -> RunConfig:
    """`federated_run_config` with the --dp-* options; a value that cannot be used ends the command (exit 2)
    naming its option."""
    if epsilon is None and noise_multiplier is not None:
        fail("--dp-noise-multiplier needs --dp-epsilon (the budget it must meet)")
    if isinstance(strategy := overrides.get("strategy"), Enum):
        overrides["strategy"] = strategy.value
    try:
        privacy = None if epsilon is None else PrivacyConfig(epsilon=epsilon, delta=delta,
                                                              noise_multiplier=noise_multiplier,
                                                              max_grad_norm=max_grad_norm)
        return federated_run_config(dataset, hospitals, privacy=privacy, **overrides)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        option = OPTION_OF_FIELD.get(where, where) if where else "--strategy"  # a model check: privacy with FedProx
        fail(f"{option}: {problem['msg']}")


# The synthetic consortium's size: how many hospitals, and each one's patient-days. By default a consortium as
# hospitals form one: an academic centre, a large and a mid-sized hospital, and two district hospitals too small to
# train a model of their own.
REALISTIC_CONSORTIUM: tuple[int, ...] = (12000, 6000, 2500, 800, 300)
Hospitals = Annotated[int | None, typer.Option(min=1, max=100, help="number of hospitals, cities cycling past 5 "
                                                "(default: as many as --rows-per-hospital lists, else 5)")]
RowsPerHospital = Annotated[str | None, typer.Option(
    help="patient-days of each hospital: one number for all, or one per hospital, comma-separated (default: "
         f"{','.join(str(rows) for rows in REALISTIC_CONSORTIUM)}, an academic centre, a large and a mid-sized "
         "hospital and two district hospitals, cycling past 5)")]


def hospital_sizes(hospitals: int | None, rows_per_hospital: str | None, *, minimum: int) -> list[int]:
    """Each hospital's patient-days from `--hospitals` and `--rows-per-hospital` (one number, one per hospital, or
    the realistic consortium); a list that cannot be used ends the command (exit 2) naming the option."""
    if rows_per_hospital is None:
        count = hospitals or len(REALISTIC_CONSORTIUM)
        return [REALISTIC_CONSORTIUM[i % len(REALISTIC_CONSORTIUM)] for i in range(count)]
    try:
        sizes = [int(part) for part in rows_per_hospital.split(",")]
    except ValueError:
        fail(f"--rows-per-hospital: {rows_per_hospital!r} is not a number or a list like 12000,6000,800")
    if min(sizes) < minimum:
        fail(f"--rows-per-hospital: at least {minimum} patient-days a hospital (got {min(sizes)})")
    if len(sizes) == 1:
        return sizes * (hospitals or len(REALISTIC_CONSORTIUM))
    if hospitals is not None and hospitals != len(sizes):
        fail(f"--hospitals: {hospitals}, but --rows-per-hospital lists {len(sizes)} hospitals")
    return sizes


def seed_list(text: str) -> list[int]:
    """`1-5` or `1,2,7` as seeds; anything else ends the command (exit 2)."""
    try:
        if "-" in text.strip("-"):
            low, high = (int(part) for part in text.split("-", 1))
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds:
        fail(f"--seeds: {text!r} is not a range like 1-5 or a list like 1,2,7")
    return seeds
