"""The `health-mlops` command: one subcommand per job.

Human output is rich tables on stdout and progress bars on stderr; `--json` prints one JSON document on
stdout instead, for scripts. A file or spec that cannot be used ends the command with exit code 2 and a
message naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from health_mlops import faults, strict_json
from health_mlops.config import Settings, TrainingDefaults, get_settings, get_training_defaults, settings_audit_log
from health_mlops.data.diabetes import write_diabetes_sites
from health_mlops.data.hospital import HospitalData, load_hospitals
from health_mlops.data.io import DataError
from health_mlops.data.synthetic import SPEC_FILE_NAME, generate_dataset, read_reference
from health_mlops.data.validate import FileReport
from health_mlops.fl.run_config import STRATEGY_NAMES, RunConfig, ServerOptimiserConfig, StrategyConfig
from health_mlops.spec import DatasetSpec, ModelDefaults, SpecError, load_spec

if TYPE_CHECKING:  # training modules import torch and the registry MLflow; `data` commands should not pay for it
    from health_mlops.data.usability import SiteAssessment
    from health_mlops.demo import Ports, Processes
    from health_mlops.fl.messages import RunView
    from health_mlops.ml.baselines import ExperimentResult, HospitalSplit
    from health_mlops.registry import Registry

app = typer.Typer(help="Health MLOps: federated health-risk models for hospital consortia.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Generate and validate hospital data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
registry_app = typer.Typer(help="Model versions in the registry: list, promote, roll back.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")
audit_app = typer.Typer(help="The audit log: verify that no line was changed, removed, inserted or reordered.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")

out = Console(highlight=False)
if not out.is_terminal:
    out.width = 120  # piped or captured output: rich's default of 80 columns truncates the tables
err = Console(stderr=True, highlight=False)

# How many quarantined rows a human-readable report lists per file (--json lists them all).
_ROWS_SHOWN = 10


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        out.print(f"health-mlops {version('health-mlops')}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="print the version and exit")] = False) -> None:
    """Health MLOps: federated health-risk models for hospital consortia."""


class Mode(str, Enum):
    pooled = "pooled"
    local = "local"
    federated = "federated"


# Defaults shown in --help, read from where they are defined.
_TRAINING = TrainingDefaults.model_fields
_RUN = RunConfig.model_fields
_STRATEGY = StrategyConfig.model_fields

# The model kinds are the spec's: one list.
ModelKind = Enum("ModelKind", {kind: kind for kind in get_args(ModelDefaults.model_fields["kind"].annotation)},
                 type=str)  # type: ignore[misc]

# The CLI's choices are the strategies module's names: one list, so a new strategy appears here by itself.
Strategy = Enum("Strategy", {name: name for name in STRATEGY_NAMES}, type=str)  # type: ignore[misc]

# Differential privacy, the same four options on every command that starts a federated run.
DpEpsilon = Annotated[float | None, typer.Option(
    "--dp-epsilon", help="train with differential privacy (DP-SGD at every hospital): the ε each hospital may "
                         "spend over the whole run; a budget that cannot be met is refused before training")]
DpDelta = Annotated[float, typer.Option("--dp-delta", help="with --dp-epsilon: the δ of the (ε, δ) guarantee")]
DpNoise = Annotated[float | None, typer.Option(
    "--dp-noise-multiplier", help="with --dp-epsilon: noise per clipped gradient (default: the least that meets ε)")]
DpClip = Annotated[float, typer.Option("--dp-max-grad-norm",
                                       help="with --dp-epsilon: each record's gradient is clipped to this norm")]
# A run-config field a refusal names -> the option that sets it.
_OPTION_OF_FIELD = {"epsilon": "--dp-epsilon", "delta": "--dp-delta", "noise_multiplier": "--dp-noise-multiplier",
                    "max_grad_norm": "--dp-max-grad-norm", "proximal_mu": "--proximal-mu",
                    "trim_fraction": "--trim-fraction"}


@contextmanager
def _clean_errors() -> Iterator[None]:
    """A data or spec problem ends the command with its message and exit code 2, not a traceback."""
    try:
        yield
    except (DataError, SpecError) as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


def _resolve_spec(spec: str | None, data: Path | None) -> DatasetSpec:
    """`--spec` if given, else the data folder's own `spec.yaml`, else the built-in health-risk task."""
    if spec is not None:
        return load_spec(spec)
    if data is not None and data.is_dir() and (data / SPEC_FILE_NAME).is_file():
        return load_spec(data / SPEC_FILE_NAME)
    return load_spec("health-risk")


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True)


def _print_json(document: object) -> None:
    """Strict JSON: an undefined value (NaN, infinite) is null, which every parser reads."""
    sys.stdout.write(strict_json.dumps(document, indent=2) + "\n")


@data_app.command("generate")
def data_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write hospital-1 ... hospital-N into")],
    hospitals: Annotated[int, typer.Option(min=1, max=100, help="number of hospitals (cities cycle past 5)")] = 5,
    rows_per_hospital: Annotated[int, typer.Option(min=10, help="patient-days per hospital")] = 4000,
    seed: Annotated[int, typer.Option(help="generator seed: the same seed writes the same files")] = 0,
    spec: Annotated[str, typer.Option(help="health-risk (synthetic) or diabetes (scikit-learn's real data)")] = "health-risk",
    json_output: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Write one data folder per hospital, with the spec (and for synthetic data, the Bayes-optimal scores)."""
    settings = get_settings()
    with _clean_errors():
        if spec == "diabetes":
            sites = write_diabetes_sites(out_dir)
            if json_output:
                _print_json([asdict(s) for s in sites])
                return
            table = Table(title=f"diabetes data set by age band → {out_dir}")
            for column in ("hospital", "ages", "rows", "mean progression"):
                table.add_column(column, justify="left" if column == "hospital" else "right")
            for s in sites:
                table.add_row(s.hospital_id, s.ages, str(s.rows), f"{s.mean_progression:.1f}")
            out.print(table)
            return
        if spec != "health-risk":
            raise SpecError(f"{spec}: data generate writes the built-in tasks only (health-risk or diabetes)")
        with err.status(f"generating {hospitals} × {rows_per_hospital} patient-days"):
            summaries = generate_dataset(out_dir, n_hospitals=hospitals, rows_per_hospital=rows_per_hospital,
                                         seed=seed, split_seed=settings.split_seed,
                                         test_fraction=settings.test_fraction, stratify=settings.stratified_split)
    if json_output:
        _print_json([asdict(s) for s in summaries])
        return
    table = Table(title=f"synthetic health-risk data, seed {seed} → {out_dir}",
                  caption="means per hospital: age (years), PM2.5 (µg/m³), temp (°C); shares: events, asthma/COPD")
    headers = ("hospital", "city", "rows", "events", "age", "PM2.5", "temp", "asthma", "Bayes AUC")
    for column in headers:
        table.add_column(column, justify="left" if column in ("hospital", "city") else "right", no_wrap=True)
    for s in summaries:
        table.add_row(s.hospital_id, s.city, str(s.rows), f"{s.event_rate:.1%}", f"{s.mean_age:.1f}",
                      f"{s.mean_pm25:.1f}", f"{s.mean_temperature:.1f}", f"{s.asthma_copd_share:.1%}",
                      f"{s.bayes_auc:.3f}")
    out.print(table)


def _print_report(report: FileReport) -> None:
    status = "[green]ok[/]" if report.rows_quarantined == 0 else f"[yellow]{report.rows_quarantined} quarantined[/]"
    out.print(f"[bold]{report.file}[/]: {report.rows_read} rows read, {report.rows_valid} valid, {status}")
    if report.ignored_columns:
        out.print(f"  columns not in the spec, ignored: {', '.join(report.ignored_columns)}")
    if report.missing_values:
        counts = ", ".join(f"{name} {n}" for name, n in report.missing_values.items())
        out.print(f"  not measured, filled in for training: {counts}")
    for q in report.quarantined[:_ROWS_SHOWN]:
        out.print(f"  line {q.line}: {q.summary}", markup=False)
    if report.rows_quarantined > _ROWS_SHOWN:
        out.print(f"  ... and {report.rows_quarantined - _ROWS_SHOWN} more (all in the report file)")


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="a data file, a hospital folder, or a folder of hospital folders")],
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path")] = None,
    report_dir: Annotated[Path | None, typer.Option(help="where reports and quarantined rows go")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print every file's report as JSON")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 2 when any hospital is left out or warned "
                                                          "about")] = False,
) -> None:
    """Check every row against the spec; quarantine invalid rows (with line and reason), keep the rest; say which
    hospitals cannot take part in training and why. Exit 0: every hospital usable; 1: usable, with hospitals left
    out or warnings; 2: no hospital usable (or, with --strict, any of these)."""
    from health_mlops.data.usability import assess_sites

    settings = get_settings()
    with _clean_errors():
        dataset = _resolve_spec(spec, path)
        quality_dir = report_dir or settings.quality_dir / path.resolve().name
        hospitals = load_hospitals(path, spec=dataset, quality_dir=quality_dir)
    reports = _unique_reports(hospitals)
    sites = assess_sites(hospitals, dataset)
    flagged = [a for a in sites.values() if a.excluded or a.warnings]
    usable = [a for a in sites.values() if a.excluded is None]
    code = 2 if not usable or (strict and flagged) else 1 if flagged else 0
    if json_output:
        _print_json({"spec": dataset.name, "report_dir": str(quality_dir),
                     "hospitals": {h: a.to_json() for h, a in sites.items()},
                     "files": [r.model_dump(mode="json") for r in reports], "exit_code": code})
    else:
        for report in reports:
            _print_report(report)
        quarantined = sum(r.rows_quarantined for r in reports)
        out.print(f"{len(reports)} file(s), {sum(r.rows_valid for r in reports)} valid rows, {quarantined} "
                  f"quarantined; reports and quarantined rows in {quality_dir}")
        for assessment in flagged:
            _print_site(assessment)
        if not usable:
            err.print("[bold red]error:[/] no hospital has data that can be trained on", markup=True)
    if code:
        raise typer.Exit(code)


def _print_site(assessment: SiteAssessment) -> None:
    if assessment.excluded is not None:
        err.print(f"[bold yellow]{assessment.hospital}[/]: left out of training: {assessment.excluded}",
                  markup=True, soft_wrap=True)
    for warning in assessment.warnings:
        err.print(f"[yellow]{assessment.hospital}[/]: warning: {warning}", markup=True, soft_wrap=True)


def _unique_reports(hospitals: dict[str, HospitalData]) -> list[FileReport]:
    # Hospitals split out of one multi-site file share that file's report.
    seen: dict[str, FileReport] = {}
    for data in hospitals.values():
        for report in data.reports:
            seen.setdefault(report.file, report)
    return list(seen.values())


def _load_splits(data: Path, dataset: DatasetSpec, settings: Settings
                 ) -> tuple[list[HospitalSplit], dict[str, str], dict[str, list[str]]]:
    """The train/test split of every hospital that can take part, those left out with the reason, and warnings
    about the others (each said on stderr); no usable hospital ends the command (exit 2)."""
    from health_mlops.data.usability import assess_sites, excluded, warning_about_test_rows, usable
    from health_mlops.ml.baselines import split_hospitals

    hospitals = load_hospitals(data, dataset, quality_dir=settings.quality_dir / data.resolve().name)
    quarantined = sum(h.rows_quarantined for h in hospitals.values())
    if quarantined:
        err.print(f"{quarantined} invalid row(s) quarantined; see {settings.quality_dir / data.resolve().name}")
    sites = assess_sites(hospitals, dataset)
    for assessment in sites.values():
        _print_site(assessment)
    kept = usable(hospitals, sites)
    if not kept:
        err.print("[bold red]error:[/] no hospital has data that can be trained on", markup=True)
        raise typer.Exit(2)
    splits = split_hospitals(kept, dataset, seed=settings.split_seed, test_fraction=settings.test_fraction,
                             stratify=settings.stratified_split)
    warnings = {h: list(sites[h].warnings) for h in kept}
    for split in splits:
        warning = warning_about_test_rows(split.test, dataset)
        if warning is not None:
            err.print(f"[yellow]{split.hospital_id}[/]: warning: {warning}", markup=True, soft_wrap=True)
            warnings[split.hospital_id].append(warning)
    return splits, excluded(sites), {h: w for h, w in warnings.items() if w}


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="data root: one folder per hospital, or a file with a site column")],
    mode: Annotated[Mode, typer.Option(help="pooled: one model on all rows; local: one model per hospital; "
                                            "federated: aggregator and nodes over loopback HTTP")],
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help=f"epochs (pooled, local; default: the spec's "
                                                           f"training.epochs, else {_TRAINING['epochs'].default}) or "
                                                           f"local epochs per round (federated; default: the "
                                                           f"spec's epochs spread over the rounds, else "
                                                           f"{_RUN['local_epochs'].default})")] = None,
    learning_rate: Annotated[float | None, typer.Option(
        min=0.0, help=f"default: the spec's, else {_TRAINING['learning_rate'].default}")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help=f"default: the spec's, else {_TRAINING['batch_size'].default}")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        min=0.0, help=f"L2 penalty; default {_TRAINING['weight_decay'].default}")] = None,
    model: Annotated[ModelKind | None, typer.Option(help="default: the spec's model")] = None,
    hidden: Annotated[str | None, typer.Option(help="mlp hidden layer widths, e.g. 64,32; default: the "
                                                    "spec's")] = None,
    rounds: Annotated[int | None, typer.Option(
        min=1, help=f"federated: training rounds; default {_RUN['rounds'].default}")] = None,
    local_steps: Annotated[int | None, typer.Option(
        min=1, help="federated, instead of --epochs: optimiser steps each hospital takes a round, whatever its "
                    "size (not with differential privacy)")] = None,
    strategy: Annotated[Strategy, typer.Option(help="federated: aggregation strategy")] = Strategy["fedavg"],
    proximal_mu: Annotated[float | None, typer.Option(
        min=0.0, help=f"fedprox: the proximal term's weight; default {_STRATEGY['proximal_mu'].default}")] = None,
    server_learning_rate: Annotated[float | None, typer.Option(
        min=0.0, help=f"fedadam, fedyogi: the server optimiser's step; default "
                      f"{ServerOptimiserConfig.model_fields['learning_rate'].default}")] = None,
    trim_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=0.49, help=f"trimmed_mean: share cut from each end; default "
                                f"{_STRATEGY['trim_fraction'].default}")] = None,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    dp_noise_multiplier: DpNoise = None,
    dp_max_grad_norm: DpClip = 1.0,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
) -> None:
    """Train a baseline or a federation and score it on every hospital's test rows."""
    import torch

    from health_mlops.ml.baselines import run_local, run_pooled
    from health_mlops.ml.train_config import TrainConfig

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    with _clean_errors():
        dataset = _with_model(_resolve_spec(spec, data), model, hidden)
        splits, left_out, warnings = _load_splits(data, dataset, settings)
    if mode is not Mode.federated and dp_epsilon is not None:
        err.print("[bold red]error:[/] --dp-epsilon: differential privacy is for --mode federated", markup=True)
        raise typer.Exit(2)
    if local_steps is not None and (mode is not Mode.federated or epochs is not None):
        err.print("[bold red]error:[/] --local-steps: only for --mode federated, and instead of --epochs", markup=True)
        raise typer.Exit(2)
    strategy_options = {"--proximal-mu": (proximal_mu, {"fedprox"}),
                        "--server-learning-rate": (server_learning_rate, {"fedadam", "fedyogi"}),
                        "--trim-fraction": (trim_fraction, {"trimmed_mean"})}
    for option, (value, strategies) in strategy_options.items():
        if value is not None and (mode is not Mode.federated or Strategy(strategy).value not in strategies):
            err.print(f"[bold red]error:[/] {option}: only for --mode federated with --strategy "
                      f"{' or '.join(sorted(strategies))}", markup=True)
            raise typer.Exit(2)
    if mode is Mode.federated:
        config = _run_config(dataset, len(splits), epsilon=dp_epsilon, delta=dp_delta,
                             noise_multiplier=dp_noise_multiplier, max_grad_norm=dp_max_grad_norm, rounds=rounds,
                             local_epochs=epochs, local_steps=local_steps, learning_rate=learning_rate,
                             batch_size=batch_size, weight_decay=weight_decay, strategy=strategy,
                             proximal_mu=proximal_mu, server_learning_rate=server_learning_rate,
                             trim_fraction=trim_fraction)
        result = _train_federated(data, dataset, splits, settings, config)
        for hospital, columns in _withheld_columns(result).items():
            warning = (f"round 0 withheld {columns} column(s) (a category, or a feature not measured, of fewer than "
                       f"5 patients); the federation's standardisation and fill-in leave this hospital out of them")
            err.print(f"[yellow]{hospital}[/]: warning: {warning}", markup=True, soft_wrap=True)
            warnings.setdefault(hospital, []).append(warning)
    else:
        config = TrainConfig.for_task(get_training_defaults(), dataset, epochs=epochs, learning_rate=learning_rate,
                                      batch_size=batch_size, weight_decay=weight_decay)
        runner = run_pooled if mode is Mode.pooled else run_local
        total = config.epochs * (1 if mode is Mode.pooled else len(splits))
        with _progress() as progress:
            task = progress.add_task(f"training {mode.value}", total=total)
            result = runner(dataset, splits, config, on_epoch=lambda _name, _epoch: progress.advance(task))
    result.extra["excluded"] = left_out
    result.extra["warnings"] = warnings
    result.extra["model"] = dataset.model.model_dump(mode="json")
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                               stratify=settings.stratified_split)
    document = result.to_json()
    if reference is not None:
        document["reference"] = reference
    if json_output:
        _print_json(document)
        return
    columns = {mode.value: result.to_json()}
    if reference is not None:
        columns = {"Bayes-optimal": reference, **columns}
    out.print(comparison_table(dataset, columns, title=f"{dataset.name}: {mode.value} training"))
    if dataset.task == "binary":
        out.print(clinical_table(document))
    if "timing" in document:
        out.print("timing: " + ", ".join(f"{k} {v}" for k, v in document["timing"].items()))
    _print_privacy(document.get("privacy"))


def federated_run_config(dataset: DatasetSpec, hospitals: int, **overrides: object) -> RunConfig:
    """A run over every hospital with the task's training settings; `overrides` that are None are not given.

    The spec's `training.epochs` (passes over the data a model of the task needs) are spread over the rounds:
    each hospital trains ceil(epochs / rounds) local epochs a round unless `local_epochs` is given."""
    from health_mlops.ml.train_config import TrainConfig

    given = {k: v for k, v in overrides.items() if v is not None}
    defaults = get_training_defaults()
    if given.get("privacy") is not None:  # DP-SGD's own defaults, unless given
        given = {"learning_rate": defaults.dp_learning_rate, "batch_size": defaults.dp_batch_size, **given}
    local = TrainConfig.for_task(defaults, dataset, learning_rate=given.pop("learning_rate", None),
                                 batch_size=given.pop("batch_size", None), weight_decay=given.pop("weight_decay", None))
    if "local_epochs" not in given and dataset.training.epochs is not None:
        rounds = int(given.get("rounds", _RUN["rounds"].default))
        given["local_epochs"] = -(-dataset.training.epochs // rounds)
    strategy: dict[str, object] = {"name": Strategy(given.pop("strategy", Strategy["fedavg"])).value}
    for option in ("proximal_mu", "trim_fraction"):
        if option in given:
            strategy[option] = given.pop(option)
    if "server_learning_rate" in given:
        strategy["server"] = ServerOptimiserConfig(learning_rate=given.pop("server_learning_rate"))
    return RunConfig(learning_rate=local.learning_rate, batch_size=local.batch_size, weight_decay=local.weight_decay,
                     min_hospitals=hospitals, strategy=StrategyConfig(**strategy), **given)


def _with_model(dataset: DatasetSpec, kind: ModelKind | None, hidden: str | None) -> DatasetSpec:
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
            err.print(f"[bold red]error:[/] --hidden: {hidden!r} is not a list of layer widths like 64,32", markup=True)
            raise typer.Exit(2)
        model = model.model_copy(update={"hidden": widths})
    return dataset.model_copy(update={"model": model})


def _run_config(dataset: DatasetSpec, hospitals: int, *, epsilon: float | None, delta: float,
                noise_multiplier: float | None, max_grad_norm: float, **overrides: object) -> RunConfig:
    """`federated_run_config` with the --dp-* options; a value that cannot be used ends the command (exit 2)
    naming its option."""
    from pydantic import ValidationError

    from health_mlops.fl.run_config import PrivacyConfig

    if epsilon is None and noise_multiplier is not None:
        err.print("[bold red]error:[/] --dp-noise-multiplier needs --dp-epsilon (the budget it must meet)", markup=True)
        raise typer.Exit(2)
    try:
        privacy = None if epsilon is None else PrivacyConfig(epsilon=epsilon, delta=delta,
                                                              noise_multiplier=noise_multiplier,
                                                              max_grad_norm=max_grad_norm)
        return federated_run_config(dataset, hospitals, privacy=privacy, **overrides)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        option = _OPTION_OF_FIELD.get(where, where) if where else "--strategy"  # a model check: privacy with FedProx
        err.print(f"[bold red]error:[/] {option}: {problem['msg']}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


def privacy_json(view: RunView) -> dict[str, object] | None:
    """What `--json` says of a run's privacy: the largest ε over hospitals, δ, and each hospital's ε."""
    if view.privacy is None:
        return None
    return {"epsilon": view.privacy.epsilon, "delta": view.privacy.delta, "budget_epsilon": view.privacy.budget_epsilon,
            "hospitals": {h: p.epsilon for h, p in view.privacy.hospitals.items()}}


def _print_privacy(privacy: dict[str, object] | None) -> None:
    """One line under a result trained with differential privacy (`privacy_json`)."""
    if privacy is not None:
        out.print(f"differential privacy: ε = {privacy['epsilon']:.2f} (the most any hospital spent; budget "
                  f"{privacy['budget_epsilon']:g}), δ = {privacy['delta']:g}", soft_wrap=True)


def _withheld_columns(result: ExperimentResult) -> dict[str, int]:
    """Hospital -> how many columns its round-0 statistics withheld as describing too few patients."""
    run = result.extra.get("run")
    suppressed = run.get("suppressed", {}) if isinstance(run, dict) else {}
    return {h: cells["categories"] for h, cells in suppressed.items() if cells.get("categories")}


def _train_federated(data: Path, dataset: DatasetSpec, splits: list[HospitalSplit], settings: Settings,
                     config: RunConfig) -> ExperimentResult:
    from health_mlops.fl.loopback import RunEnded, run_federation_over_loopback
    from health_mlops.fl.simulation import score_global_model

    with _clean_errors():
        hospitals = load_hospitals(data, dataset)
    try:
        with _progress() as progress:
            task = progress.add_task("federated rounds", total=config.rounds + 2)
            outcome = run_federation_over_loopback(
                dataset, hospitals, config, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                stratify=settings.stratified_split,
                on_progress=lambda view: progress.update(task, completed=len(view.history)))
    except RunEnded as ended:
        err.print(f"[bold red]error:[/] {ended}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    result = score_global_model(dataset, splits, outcome.run.preprocessing, outcome.weights)
    result.extra["timing"] = outcome.timing.to_json()
    result.extra["run"] = {"id": outcome.run.id, "config": outcome.run.config.model_dump(mode="json"),
                           "rejected": outcome.run.rejected, "suppressed": outcome.run.suppressed,
                           "excluded": outcome.run.excluded}
    result.extra["privacy"] = privacy_json(outcome.run)
    return result


@app.command("start-run")
def start_run(
    rounds: Annotated[int | None, typer.Option(min=1, help="env HEALTH_MLOPS_FL_ROUNDS (20)")] = None,
    strategy: Annotated[Strategy | None, typer.Option(help="env HEALTH_MLOPS_FL_STRATEGY (fedavg)")] = None,
    hospital: Annotated[list[str] | None, typer.Option(help="a hospital to enrol (repeat); default: every "
                                                           "provisioned hospital")] = None,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    dp_noise_multiplier: DpNoise = None,
    dp_max_grad_norm: DpClip = 1.0,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask the aggregator (HEALTH_MLOPS_AGGREGATOR_URL, admin token) to start a federated run."""
    import httpx

    from health_mlops.config import get_federation_defaults
    from health_mlops.fl.client import AdminClient, RunRefused
    from health_mlops.fl.messages import RunRequest
    from health_mlops.security import admin_credential
    from health_mlops.tls import TlsError

    from pydantic import ValidationError

    settings = get_settings()
    try:
        federation = get_federation_defaults()
    except ValidationError as exc:
        problem = exc.errors()[0]
        err.print(f"[bold red]error:[/] HEALTH_MLOPS_FL_{str(problem['loc'][0]).upper()}: {problem['msg']}",
                  markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    credential = admin_credential(settings.admin_token, settings.credentials_dir)
    if credential is None:
        err.print(f"[bold red]error:[/] no admin token: set HEALTH_MLOPS_ADMIN_TOKEN or put admin.token in "
                  f"{settings.credentials_dir}", markup=True, soft_wrap=True)
        raise typer.Exit(2)
    with _clean_errors():
        dataset = load_spec(settings.spec)
    chosen = Strategy(strategy.value if strategy else federation.strategy)
    config = _run_config(dataset, len(hospital) if hospital else federation.min_hospitals, epsilon=dp_epsilon,
                         delta=dp_delta, noise_multiplier=dp_noise_multiplier, max_grad_norm=dp_max_grad_norm,
                         rounds=rounds or federation.rounds, local_epochs=federation.local_epochs, strategy=chosen)
    request = RunRequest(config=config, hospitals=hospital or None)
    try:
        with AdminClient(settings.aggregator_url, credential) as admin:
            run = admin.start_run(request)
    except TlsError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    except httpx.TransportError as exc:
        err.print(f"[bold red]error:[/] cannot reach the aggregator at {settings.aggregator_url}: {exc}",
                  markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    except RunRefused as refused:
        err.print(f"[bold red]error:[/] {refused}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    if json_output:
        _print_json(run.model_dump(mode="json"))
    else:
        privacy = run.config.privacy
        out.print(f"started {run.id}: {run.config.rounds} rounds of {run.config.strategy.name} "
                  f"over {', '.join(run.hospitals)}" + ("" if privacy is None else
                                                          f", differential privacy ε ≤ {privacy.epsilon:g} at "
                                                          f"δ = {privacy.delta:g} per hospital"), soft_wrap=True)


@app.command()
def provision(
    hospitals: Annotated[int | None, typer.Option(min=1, max=1000, help="issue for hospital-1 .. hospital-N")] = None,
    hospital: Annotated[list[str] | None, typer.Option(help="issue for this hospital (repeatable)")] = None,
    server_name: Annotated[list[str] | None, typer.Option(help="another DNS name or IP address the aggregator "
                                                                "is reached by (repeatable)")] = None,
    rotate: Annotated[list[str] | None, typer.Option(help="new token and certificate for this hospital, "
                                                           "'admin' or 'aggregator'; the old ones stop working")] = None,
    revoke: Annotated[list[str] | None, typer.Option(help="revoke this hospital's token and certificate")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="default: the credentials folder of "
                                                                "$HEALTH_MLOPS_HOME")] = None,
) -> None:
    """Issue credentials once: the consortium CA, the aggregator's server certificate, and for the admin and
    each hospital a token and a client certificate (existing ones are kept); rotate or revoke one."""
    from health_mlops.data.synthetic import hospital_ids
    from health_mlops.pki import DASHBOARD, SERVER, PkiError
    from health_mlops.pki import revoke as revoke_certificate
    from health_mlops.pki import rotate as rotate_certificate
    from health_mlops.security import ADMIN, CredentialError, revoke_token, rotate_token
    from health_mlops.security import provision as issue

    names = [*(hospital_ids(hospitals) if hospitals else []), *(hospital or [])]
    if not (names or rotate or revoke or server_name):
        err.print("[bold red]error:[/] name the hospitals (--hospitals N or --hospital NAME), or --rotate or "
                  "--revoke one", markup=True)
        raise typer.Exit(2)
    directory = out_dir or get_settings().credentials_dir
    try:
        for name in revoke or []:
            if name in (ADMIN, SERVER, DASHBOARD):
                raise CredentialError(f"{name}: cannot be revoked, only rotated (--rotate {name})")
            revoke_token(directory, name)
            revoke_certificate(directory, name)
            out.print(f"revoked {name}: its token and certificate no longer work")
        for name in rotate or []:
            if name not in (SERVER, DASHBOARD):
                rotate_token(directory, name)
            rotate_certificate(directory, name, server_names=server_name)
            out.print(f"rotated {name}: give it the new {name}.crt/.key" + ("" if name in (SERVER, DASHBOARD) else
                                                                           f" and {name}.token"))
        new = issue(directory, names, server_names=server_name)
    except (CredentialError, PkiError) as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"credentials in {directory}: " + (f"issued {', '.join(new)}" if new else "nothing new to issue"),
              soft_wrap=True)
    out.print("give each hospital only ca.crt and its own <hospital>.token, .crt and .key; the aggregator needs "
              "registry.json, ca.crt, crl.pem and aggregator.crt/.key", soft_wrap=True)


@app.command()
def aggregator(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the API, over mutual TLS")] = 8080,
    ops_port: Annotated[int, typer.Option(help="/healthz, /readyz and /metrics, plain HTTP for the kubelet and "
                                               "Prometheus")] = 8081,
    plain_http: Annotated[bool, typer.Option(help="serve the API without TLS (loopback experiments only)")] = False,
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path (default: settings)")] = None,
) -> None:
    """Run the aggregator service: runs, rounds, checkpoints (resumes from the last one on restart)."""
    from health_mlops.audit import AuditError
    from health_mlops.fl.aggregator import serve
    from health_mlops.fl.store import CheckpointError
    from health_mlops.registry import QualityGate, Registry
    from health_mlops.security import CredentialError
    from health_mlops.tls import TlsError

    settings = get_settings()
    _configure_logging()
    try:
        faults.arm(settings.crash_at)
        with _clean_errors():
            dataset = load_spec(spec or settings.spec)
        audit = settings_audit_log(settings)
        serve(dataset, settings.models_dir, settings.credentials_dir, host=host, port=port, ops_port=ops_port,
              plain_http=plain_http, registry_factory=lambda: Registry(settings.home, dataset.name, audit=audit),
              quality_gate=QualityGate(settings.quality_gate_tolerance, settings.quality_gate_calibration),
              audit=audit)
    except (CredentialError, CheckpointError, TlsError, AuditError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def node(
    hospital_id: Annotated[str | None, typer.Option(help="env HOSPITAL_ID")] = None,
    node_id: Annotated[str | None, typer.Option(help="this replica's name; env NODE_ID (default: host name)")] = None,
    city: Annotated[str | None, typer.Option(help="env CITY_NAME")] = None,
    central_url: Annotated[str | None, typer.Option(help="the aggregator; env CENTRAL_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="this hospital's data folder; env DATA_DIR")] = None,
    token_file: Annotated[Path | None, typer.Option(help="default: env HEALTH_MLOPS_TOKEN, else "
                                                         "<credentials>/<hospital>.token")] = None,
    host: Annotated[str, typer.Option(help="interface for the node API and metrics")] = "127.0.0.1",
    api_port: Annotated[int | None, typer.Option(help="node API; env NODE_API_PORT (5001)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics; env METRICS_PORT (8001)")] = None,
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path")] = None,
) -> None:
    """Run one hospital node: validate the local data, then take tasks from the aggregator."""
    import socket

    import torch

    from health_mlops.config import get_node_settings
    from health_mlops.data.hospital import load_hospital
    from health_mlops.fl.node import HospitalNode, serve
    from health_mlops.security import ClientCredential, CredentialError, read_token
    from health_mlops.tls import TlsError

    settings, env = get_settings(), get_node_settings()
    torch.set_num_threads(settings.torch_threads)
    _configure_logging()
    hospital_name = hospital_id or env.hospital_id
    folder = data_dir or env.data_dir
    if not hospital_name or folder is None:
        err.print("[bold red]error:[/] a node needs --hospital-id (HOSPITAL_ID) and --data-dir (DATA_DIR)",
                  markup=True)
        raise typer.Exit(2)
    try:  # the credential first: without it, reading the data is wasted
        credential = ClientCredential.from_directory(
            settings.credentials_dir, hospital_name, token=read_token(token_file) if token_file else settings.token)
    except CredentialError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    with _clean_errors():
        dataset = load_spec(spec or settings.spec)
        data = load_hospital(folder, dataset, hospital_id=hospital_name,
                             quality_dir=settings.quality_dir / hospital_name)
    try:
        worker = HospitalNode(data=data, spec=dataset, node_id=node_id or env.node_id or socket.gethostname(),
                              city=city or env.city_name, central_url=central_url or env.central_url,
                              credential=credential, split_seed=settings.split_seed,
                              test_fraction=settings.test_fraction, stratify=settings.stratified_split,
                              poll_wait_s=settings.poll_wait_s)
    except TlsError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    serve(worker, host=host, api_port=api_port or env.api_port, metrics_port=metrics_port or env.metrics_port)


def _registry(spec: str | None) -> Registry:
    from health_mlops.registry import Registry

    settings = get_settings()
    with _clean_errors():
        dataset = load_spec(spec or settings.spec)
    return Registry(settings.home, dataset.name, audit=settings_audit_log(settings))


def _cli_user() -> str:
    import getpass
    import socket

    return f"cli: {getpass.getuser()}@{socket.gethostname()}"


def _admin_actor(registry: Registry, action: str, token_file: Path | None) -> str:
    """The actor of a registry change: the admin, proven by the admin token (`--admin-token-file`,
    HEALTH_MLOPS_ADMIN_TOKEN or the credentials folder's) checked against the credentials registry. A refusal
    is audited and ends the command with exit code 2."""
    from health_mlops.security import ADMIN, CredentialError, admin_refusal, read_token, token_path

    settings = get_settings()
    try:
        token = (read_token(token_file) if token_file else settings.admin_token
                 or read_token(token_path(settings.credentials_dir, ADMIN)))
    except CredentialError as exc:
        problem: str | None = str(exc)
    else:
        problem = admin_refusal(token, settings.credentials_dir)
    if problem is not None:
        registry.audit.append(f"registry {action}", f"unknown ({_cli_user()})", outcome="refused 401",
                              model=registry.model_name, reason=problem)
        err.print(f"[bold red]error:[/] {action} needs the admin credential: {problem}", markup=True,
                  soft_wrap=True)
        raise typer.Exit(2)
    return f"admin ({_cli_user()})"


def _print_versions(registry: Registry) -> None:
    table = Table(title=f"{registry.model_name} in {registry.tracking_uri}")
    for column in ("version", "aliases", "metric", "privacy", "federation run", "created"):
        table.add_column(column, justify="right" if column in ("version", "metric") else "left")
    from datetime import datetime

    for v in registry.versions():
        table.add_row(str(v.version), ", ".join(v.aliases), f"{v.metric_name} {v.metric:.4f}", v.privacy_text(),
                      v.federation_run, f"{datetime.fromtimestamp(v.created_at):%Y-%m-%d %H:%M:%S}")
    out.print(table)


SpecOption = Annotated[str | None, typer.Option(help="the task whose model (built-in name or YAML path)")]


@registry_app.command("list")
def registry_list(spec: SpecOption = None,
                  json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every registered version with its aliases and federated test metric."""
    registry = _registry(spec)
    if json_output:
        _print_json([v.to_json() for v in registry.versions()])
        return
    _print_versions(registry)


AdminTokenOption = Annotated[Path | None, typer.Option(help="the admin token (default: env "
                                                             "HEALTH_MLOPS_ADMIN_TOKEN, else <credentials>/admin.token)")]


@registry_app.command("promote")
def registry_promote(version: Annotated[int, typer.Argument(min=1)], spec: SpecOption = None,
                     admin_token_file: AdminTokenOption = None) -> None:
    """Make VERSION the champion (needs the admin credential; written to the audit log)."""
    from health_mlops.registry import RegistryError

    registry = _registry(spec)
    actor = _admin_actor(registry, "promote", admin_token_file)
    try:
        promoted = registry.promote(version, actor=actor)
    except RegistryError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(2) from None
    out.print(f"v{promoted.version} is now champion; audit log: {registry.audit_log}")


@registry_app.command("rollback")
def registry_rollback(spec: SpecOption = None, admin_token_file: AdminTokenOption = None) -> None:
    """Make the previous champion (by MLflow's version history) champion again (needs the admin credential;
    written to the audit log)."""
    from health_mlops.registry import RegistryError

    registry = _registry(spec)
    actor = _admin_actor(registry, "rollback", admin_token_file)
    try:
        restored = registry.rollback(actor=actor)
    except RegistryError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(2) from None
    out.print(f"rolled back: v{restored.version} is champion again; audit log: {registry.audit_log}")


@audit_app.command("verify")
def audit_verify(log: Annotated[Path | None, typer.Option(help="default: $HEALTH_MLOPS_HOME/audit.log")] = None) -> None:
    """Check the audit log's hash chain (and MACs, if the credentials folder has the audit key); exit 1 naming the
    first line that was changed, removed, inserted or reordered."""
    from health_mlops.audit import AuditError, load_audit_key, verify_audit

    settings = get_settings()
    path = log or settings.audit_log
    try:
        key = load_audit_key(settings.credentials_dir)
    except AuditError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    checked, problem = verify_audit(path, key)
    if problem is not None:
        err.print(f"[bold red]{path}:[/] {problem}", markup=True, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"{path}: {checked} lines, the chain is intact" + (" and every MAC matches the audit key" if key else
              " (no audit key in the credentials folder: hashes checked, MACs not)"), soft_wrap=True)


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 in a container)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 7860,
    poll_seconds: Annotated[float, typer.Option(min=0.1, help="how often to look for a new champion")] = 2.0,
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path")] = None,
) -> None:
    """Serve the champion model: the dashboard at / and the REST API at /api/v1 (one process, one worker)."""
    import gc

    import uvicorn

    from health_mlops.http_server import protocol_options
    from health_mlops.security import CredentialError
    from health_mlops.serving.app import create_dashboard_app
    from health_mlops.tls import TlsError, server_context

    settings = get_settings()
    _configure_logging()
    with _clean_errors():
        dataset = load_spec(spec or settings.spec)
    os.umask(0o077)  # uploads and batch results hold patient rows: every file this process writes is 0600
    try:
        tls = None
        if settings.dashboard_tls_cert or settings.dashboard_tls_key:
            if not (settings.dashboard_tls_cert and settings.dashboard_tls_key):
                raise TlsError("HEALTH_MLOPS_DASHBOARD_TLS_CERT and HEALTH_MLOPS_DASHBOARD_TLS_KEY go together")
            tls = server_context(settings.dashboard_tls_cert, settings.dashboard_tls_key, client_ca=None)
        served = create_dashboard_app(settings, dataset, poll_s=poll_seconds)
    except (CredentialError, TlsError) as exc:  # an API key file, a certificate or a key that cannot be read
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    # What is loaded now (MLflow, Gradio, their modules: ~380,000 objects) lives as long as the process. A full
    # garbage collection walks all of it, 210 ms during which no request is answered; frozen, it is skipped.
    gc.collect()
    gc.freeze()
    # One worker: the dashboard's sessions live in the process. No access log and no proxy-header parsing:
    # both cost every prediction, and the API logs nothing per request.
    uvicorn.run(served, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                **protocol_options(tls))


def _configure_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _cell(metrics: dict, metric: str) -> str:
    value = metrics.get(metric)
    if value is None or not math.isfinite(value):
        return "—"
    interval = metrics.get(f"{metric}_ci")
    return f"{value:.3f}" + (f" [dim]({interval[0]:.2f}–{interval[1]:.2f})[/]" if interval else "")


def comparison_table(dataset: DatasetSpec, columns: dict[str, dict], *, title: str) -> Table:
    """Hospitals as rows, ways of training as columns, the task's primary metric (and its 95% interval) in each
    cell; then the mean over hospitals (what the field reports) and the score over all test rows together."""
    metric = dataset.primary_metric
    table = Table(title=f"{title} ({metric.upper() if metric == 'auc' else 'R²'} on each hospital's test rows)")
    table.add_column("hospital")
    for name in columns:
        table.add_column(name, justify="right")
    hospitals = next(iter(columns.values()))["per_hospital"]
    for hospital_id in hospitals:
        table.add_row(hospital_id, *(_cell(c["per_hospital"][hospital_id], metric) for c in columns.values()))
    table.add_section()
    table.add_row("[bold]mean over hospitals[/]",
                  *(f"[bold]{_cell(c.get('mean_over_hospitals') or {}, metric)}[/]" for c in columns.values()))
    table.add_row("all test rows", *(_cell(c["overall"], metric) for c in columns.values()))
    return table


_CLINICAL_COLUMNS = (("Brier", "brier"), ("cal. slope", "calibration_slope"),
                     ("cal. intercept", "calibration_intercept"), ("sens.", "sensitivity"), ("spec.", "specificity"),
                     ("PPV", "ppv"), ("NPV", "npv"), ("bal. acc.", "balanced_accuracy"))


def clinical_table(result: dict) -> Table:
    """A binary model as a clinician reads it: ranking with its interval, probabilities, decisions at the
    threshold, per hospital and as the mean over hospitals."""
    threshold = result.get("threshold")
    shown = f"{threshold:.3f}" if isinstance(threshold, float) else "each hospital's own"
    table = Table(title=f"{result['mode']}: calibration, and decisions at the threshold ({shown})")
    table.add_column("hospital", no_wrap=True)
    table.add_column("AUC (95% CI)", justify="right", no_wrap=True)
    for title, _ in _CLINICAL_COLUMNS:
        table.add_column(title, justify="right")

    def row(name: str, metrics: dict) -> list[str]:
        return [name, _cell(metrics, "auc"), *(_cell(metrics, key) for _, key in _CLINICAL_COLUMNS)]

    for hospital_id, metrics in result["per_hospital"].items():
        table.add_row(*row(hospital_id, metrics))
    table.add_section()
    table.add_row(*row("mean over hospitals", result["mean_over_hospitals"]))
    return table


def _seed_list(text: str) -> list[int]:
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
        err.print(f"[bold red]error:[/] --seeds: {text!r} is not a range like 1-5 or a list like 1,2,7", markup=True)
        raise typer.Exit(2)
    return seeds


@app.command()
def evaluate(
    seeds: Annotated[str, typer.Option(help="generator seeds, each also its split seed: a range 1-5 or a list "
                                            "1,2,7")] = "1-5",
    hospitals: Annotated[int, typer.Option(min=2, max=20)] = 5,
    rows_per_hospital: Annotated[int, typer.Option(min=100)] = 4000,
    rounds: Annotated[int | None, typer.Option(min=1, help="federated training rounds")] = None,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Pooled, local-only and federated training on the synthetic data of several seeds: each hospital's AUC as
    mean ± sd over seeds, and whether the README's claims hold on them (federated within 0.01 of pooled on the
    mean over hospitals; at every hospital at least local-only, both on average over seeds). Federated rounds run
    in memory, with the services' coordinator and hospital code."""
    import tempfile

    import torch

    from health_mlops.ml.train_config import TrainConfig
    from health_mlops.seeds import MODES, POOLED_MARGIN, evaluate_over_seeds

    chosen = _seed_list(seeds)
    dataset = load_spec("health-risk")
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    train_config = TrainConfig.for_task(get_training_defaults(), dataset)
    run_config = federated_run_config(dataset, hospitals, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="health-mlops-evaluate-") as scratch, _progress() as progress:
        task = progress.add_task(f"{len(chosen)} seeds × pooled, local, federated", total=len(chosen))
        result = evaluate_over_seeds(chosen, Path(scratch), hospitals=hospitals, rows_per_hospital=rows_per_hospital,
                                     test_fraction=settings.test_fraction, stratify=settings.stratified_split,
                                     train_config=train_config, run_config=run_config,
                                     on_seed=lambda _seed: progress.advance(task))
    if json_output:
        _print_json(result.to_json())
        return
    titles = {"federated": "federated", "pooled": "pooled", "local": "local-only", "bayes": "Bayes-optimal"}
    table = Table(title=f"AUC over seeds {seeds} (mean ± sd; {hospitals} hospitals × {rows_per_hospital} "
                        "patient-days)")
    table.add_column("hospital")
    for mode in MODES:
        table.add_column(titles[mode], justify="right")

    def cell(summary: tuple[float | None, float | None, int]) -> str:
        mean, sd, _ = summary
        return "—" if mean is None else f"{mean:.3f} ± {sd:.3f}"

    for hospital in result.hospitals:
        table.add_row(hospital, *(cell(result.hospital_summary(mode, hospital)) for mode in MODES))
    table.add_section()
    table.add_row("[bold]mean over hospitals[/]", *(cell(result.mean_summary(mode)) for mode in MODES))
    out.print(table)
    claims = result.claims()
    out.print(f"{'✓' if claims['federated_within_0.01_of_pooled'] else '✗'} federated mean AUC ≥ pooled − "
              f"{POOLED_MARGIN} (means over seeds)")
    out.print(f"{'✓' if claims['federated_at_least_local_at_every_hospital'] else '✗'} federated ≥ local-only at "
              "every hospital (means over seeds)")


@app.command()
def demo(
    hospitals: Annotated[int, typer.Option(min=2, max=20)] = 5,
    rows_per_hospital: Annotated[int, typer.Option(min=100)] = 4000,
    seed: Annotated[int, typer.Option(help="data generator seed")] = 7,
    rounds: Annotated[int | None, typer.Option(min=1, help="federated training rounds")] = None,
    port: Annotated[int, typer.Option(help="the aggregator's API port (mutual TLS)")] = 8080,
    ops_port: Annotated[int, typer.Option(help="the aggregator's health and metrics port")] = 8081,
    node_api_port: Annotated[int, typer.Option(help="first node API port (one per replica)")] = 5001,
    node_metrics_port: Annotated[int, typer.Option(help="first node metrics port (one per replica)")] = 8001,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="stop after training instead of serving the "
                                                               "dashboard")] = False,
    dashboard_port: Annotated[int, typer.Option(help="where the dashboard serves the champion")] = 7860,
    prometheus_port: Annotated[int, typer.Option(help="where Debian's prometheus serves, if installed")] = 9090,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    dp_noise_multiplier: DpNoise = None,
    dp_max_grad_norm: DpClip = 1.0,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The whole federation on loopback: aggregator and nodes as processes, trained live, compared with pooled
    and local-only training and the Bayes-optimal score; then the champion is served until Ctrl-C."""
    import torch

    from health_mlops.data.synthetic import hospital_ids
    from health_mlops.demo import DemoError, Ports, Processes, check_ports_free, node_plan, run_federation
    from health_mlops.fl.loopback import round_overheads_ms
    from health_mlops.fl.messages import RunRequest
    from health_mlops.security import provision as issue

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    data = settings.home / "data" / f"health-risk-h{hospitals}-n{rows_per_hospital}-s{seed}"
    if not (data / SPEC_FILE_NAME).is_file():
        with err.status(f"generating data into {data}"):
            generate_dataset(data, n_hospitals=hospitals, rows_per_hospital=rows_per_hospital, seed=seed,
                             split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                             stratify=settings.stratified_split)
    names = hospital_ids(hospitals)
    issued = issue(settings.credentials_dir, names)
    if issued:
        err.print(f"issued credentials for {', '.join(issued)} in {settings.credentials_dir}")
    with _clean_errors():
        dataset = _resolve_spec(None, data)
        splits, _, _ = _load_splits(data, dataset, settings)
    reference_file = json.loads((data / "reference.json").read_text(encoding="utf-8"))
    request = RunRequest(config=_run_config(dataset, hospitals, epsilon=dp_epsilon, delta=dp_delta,
                                            noise_multiplier=dp_noise_multiplier, max_grad_norm=dp_max_grad_norm,
                                            rounds=rounds), hospitals=names)
    ports = Ports(port, ops_port, node_api_port, node_metrics_port)
    serve = not (no_serve or json_output)
    try:
        if serve:
            check_ports_free([dashboard_port, prometheus_port])  # fail now, not after training
        # Every process lives until the demo ends: after training, the dashboard shows the federation live.
        with Processes(settings.home / "logs", {**os.environ, "HEALTH_MLOPS_HOME": str(settings.home),
                                                "HEALTH_MLOPS_AGGREGATOR_URL": f"https://127.0.0.1:{port}"}) as processes:
            if serve:
                nodes = [(p.hospital_id, p.node_id) for p in node_plan(data, names, {})]
                _start_prometheus(processes, settings, ports, nodes, dashboard_port, prometheus_port)
            view, body = run_federation(processes, data=data, hospitals=names,
                                        cities=reference_file.get("cities", {}), request=request, home=settings.home,
                                        credentials_dir=settings.credentials_dir, ports=ports,
                                        metric=dataset.primary_metric, console=err)
            columns, counted = _compare(dataset, splits, data, view, body, settings)
            if json_output:
                _print_json({"data": str(data), "run": {"id": view.id, "rounds": view.config.rounds,
                                                        "rejected": view.rejected, "counted_from": counted,
                                                        "suppressed": view.suppressed},
                             "privacy": privacy_json(view), "model": view.model,
                             "round_overhead_ms": round_overheads_ms(view), **columns})
                return
            _print_demo_outcome(dataset, columns, view, counted, names[0], data)
            if serve:
                _serve_dashboard(processes, dashboard_port)
    except DemoError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None


def _compare(dataset: DatasetSpec, splits: list[HospitalSplit], data: Path, view: RunView, body: bytes,
             settings: Settings) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """The federated model beside pooled and local-only training and the Bayes-optimal score; and which
    replica's result counted for each hospital."""
    from health_mlops.fl.messages import decode_weights
    from health_mlops.fl.simulation import score_global_model
    from health_mlops.ml.baselines import run_local, run_pooled
    from health_mlops.ml.train_config import TrainConfig

    federated = score_global_model(dataset, splits, view.preprocessing, decode_weights(body)[0])
    config = TrainConfig.for_task(get_training_defaults(), dataset)
    with _progress() as progress:
        pooled_task = progress.add_task("pooled training (for comparison)", total=config.epochs)
        pooled = run_pooled(dataset, splits, config, on_epoch=lambda _h, _e: progress.advance(pooled_task))
        local_task = progress.add_task("local-only training (for comparison)", total=config.epochs * len(splits))
        local = run_local(dataset, splits, config, on_epoch=lambda _h, _e: progress.advance(local_task))
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                               stratify=settings.stratified_split)
    columns: dict[str, dict] = {"federated": federated.to_json(), "pooled": pooled.to_json(),
                                "local-only": local.to_json()}
    if reference is not None:
        columns["Bayes-optimal"] = reference
    counted = {h: sorted({r.nodes[h] for r in view.history if h in r.nodes}) for h in view.hospitals}
    return columns, counted


def _print_demo_outcome(dataset: DatasetSpec, columns: dict[str, dict], view: RunView,
                        counted: dict[str, list[str]], first: str, data: Path) -> None:
    out.print(comparison_table(dataset, columns, title="federated vs pooled vs local-only vs Bayes-optimal"))
    out.print(f"run {view.id}: {view.config.rounds} rounds, each hospital counted once per round "
              f"({first}'s results came from {', '.join(counted[first])}); data: {data}", soft_wrap=True)
    _print_privacy(privacy_json(view))
    model = view.model or {}
    if model.get("status") == "registered":
        out.print(f"model: {dataset.name} v{model['version']} registered, {', '.join(model['aliases']) or 'no alias'} "
                  f"({model['metric_name']} {model['metric']:.4f} by federated evaluation); "
                  f"`health-mlops registry list` shows every version", soft_wrap=True)
    else:
        out.print(f"model: not registered ({model.get('reason', 'unknown')})")


def _start_prometheus(processes: Processes, settings: Settings, ports: Ports, nodes: list[tuple[str, str]],
                      dashboard_port: int, prometheus_port: int) -> None:
    """Debian's prometheus scraping every process of the demo, with the alert rules, if it is installed."""
    from health_mlops.prometheus import ALERT_RULES, local_config, local_targets, prometheus_command

    folder = settings.home / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    rules = settings.prometheus_rules or ALERT_RULES
    targets = local_targets(aggregator_port=ports.aggregator_ops, node_metrics_port=ports.node_metrics, nodes=nodes,
                            dashboard_port=dashboard_port)
    config.write_text(local_config(targets, rule_files=[str(rules.resolve())] if rules.is_file() else [],
                                   interval_s=settings.prometheus_scrape_interval_s), encoding="utf-8")
    command = prometheus_command(config, folder / "data", prometheus_port)
    if command is None:
        err.print(f"Prometheus is not installed (`apt-get install prometheus`); its config for this demo is "
                  f"{config}", soft_wrap=True)
        return
    processes.start_program("prometheus", command)
    err.print(f"Prometheus on http://127.0.0.1:{prometheus_port} (alerts: /alerts; config {config})", soft_wrap=True)


def _serve_dashboard(processes: Processes, port: int) -> None:
    """Serve the dashboard (a process, like every other component) beside the federation until Ctrl-C."""
    from health_mlops.demo import wait_ready

    child = processes.start("dashboard", ["dashboard", "--port", str(port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", child)
        err.print(f"dashboard on http://127.0.0.1:{port} (API: /api/v1/predict, /api/v1/model; log: "
                  f"{child.log_path}); the aggregator and nodes keep running; Ctrl-C stops everything",
                  soft_wrap=True)
        child.process.wait()
    except KeyboardInterrupt:
        err.print("stopped")


if __name__ == "__main__":
    app()
