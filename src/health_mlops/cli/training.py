"""`train` (pooled, local-only or a federation over loopback) and `evaluate` (all three over several seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from health_mlops.cli.app import app
from health_mlops.cli.data import load_splits
from health_mlops.cli.options import (RUN, SERVER_OPTIMISER, STRATEGY, TRAINING, DpClip, DpDelta, DpEpsilon, DpNoise,
                                      Hospitals, JsonOption, Mode, ModelKind, RowsPerHospital, SecureAggregation,
                                      SpecOption, Strategy, hospital_sizes, run_config_from_options, seed_list,
                                      with_model)
from health_mlops.cli.output import err, fail, models_progress, out, print_json, progress, warn
from health_mlops.cli.tables import (clinical_table, cohort_table, comparison_table, print_claims, print_privacy,
                                     privacy_json)
from health_mlops.config import Settings, get_settings, get_training_defaults
from health_mlops.fl.run_config import RunConfig, federated_run_config
from health_mlops.ml.train_config import WEIGHT_DECAY_FULL_ROWS, TrainConfig
from health_mlops.spec import DatasetSpec, load_spec, spec_for_data

if TYPE_CHECKING:  # training imports torch: only the commands that train load it
    from health_mlops.data.split import HospitalSplit
    from health_mlops.experiments.baselines import ExperimentResult


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="data root: one folder per hospital, or a file with a site column")],
    mode: Annotated[Mode, typer.Option(help="pooled: one model on all rows; local: one model per hospital; "
                                            "federated: aggregator and nodes over loopback HTTP")],
    spec: SpecOption = None,
    epochs: Annotated[int | None, typer.Option(min=1, help=f"train in epochs instead of a budget of steps: "
                                                           f"pooled and local (default: the spec's "
                                                           f"training.epochs, else {TRAINING['steps'].default} "
                                                           f"steps with early stopping), or local epochs per "
                                                           f"round (federated; default: the spec's epochs spread "
                                                           f"over the rounds, else "
                                                           f"{TRAINING['local_steps'].default} steps a round)")
                      ] = None,
    learning_rate: Annotated[float | None, typer.Option(
        min=0.0, help=f"default: the spec's, else {TRAINING['learning_rate'].default} (with --dp-epsilon "
                      f"{TRAINING['dp_learning_rate'].default})")] = None,
    batch_size: Annotated[int | None, typer.Option(
        min=1, help=f"default: the spec's, else {TRAINING['batch_size'].default} (with --dp-epsilon each "
                    f"hospital's is {TRAINING['dp_sampling_rate'].default:g} of its training rows)")] = None,
    weight_decay: Annotated[float | None, typer.Option(
        min=0.0, help=f"L2 penalty, whole on up to {WEIGHT_DECAY_FULL_ROWS} training rows (a federation's: all "
                      f"its hospitals'), shrinking as 1 / rows above; default {TRAINING['weight_decay'].default}")
                  ] = None,
    model: Annotated[ModelKind | None, typer.Option(help="default: the spec's model")] = None,
    hidden: Annotated[str | None, typer.Option(help="mlp hidden layer widths, e.g. 64,32; default: the "
                                                    "spec's")] = None,
    rounds: Annotated[int | None, typer.Option(
        min=1, help=f"federated: training rounds; default {RUN['rounds'].default}")] = None,
    local_steps: Annotated[int | None, typer.Option(
        min=1, help=f"federated, instead of --epochs: optimiser steps each hospital takes a round, whatever its "
                    f"size; default {TRAINING['local_steps'].default} (not with differential privacy)")] = None,
    strategy: Annotated[Strategy, typer.Option(help="federated: aggregation strategy")] = Strategy["fedavg"],
    proximal_mu: Annotated[float | None, typer.Option(
        min=0.0, help=f"fedprox: the proximal term's weight; default {STRATEGY['proximal_mu'].default}")] = None,
    server_learning_rate: Annotated[float | None, typer.Option(
        min=0.0, help=f"fedadam, fedyogi: the server optimiser's step; default "
                      f"{SERVER_OPTIMISER['learning_rate'].default}")] = None,
    trim_fraction: Annotated[float | None, typer.Option(
        min=0.0, max=0.49, help=f"trimmed_mean: share cut from each end; default "
                                f"{STRATEGY['trim_fraction'].default}")] = None,
    dp_epsilon: DpEpsilon = None,
    dp_delta: DpDelta = 1e-5,
    dp_noise_multiplier: DpNoise = None,
    dp_max_grad_norm: DpClip = 1.0,
    secure_aggregation: SecureAggregation = False,
    seed: Annotated[int | None, typer.Option(min=0, max=2**32 - 1, help="the models' initial weights and the "
                                             "shuffling of their rows; default: env HEALTH_MLOPS_TRAIN_SEED "
                                             "(0)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as one JSON object (on failure: "
                                                             "{error, exit_code, reason})")] = False,
) -> None:
    """Train a baseline or a federation and score it on every hospital's test rows."""
    import torch

    from health_mlops.data.synthetic import read_reference
    from health_mlops.experiments.baselines import run_local, run_pooled

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    dataset = with_model(spec_for_data(spec, data), model, hidden)
    splits, left_out, warnings = load_splits(data, dataset, settings)
    federated_only = {"--dp-epsilon": dp_epsilon, "--secure-aggregation": secure_aggregation or None,
                      "--local-steps": local_steps, "--proximal-mu": proximal_mu,
                      "--server-learning-rate": server_learning_rate, "--trim-fraction": trim_fraction}
    for option, value in federated_only.items():
        if value is not None and mode is not Mode.federated:
            fail(f"{option}: only for --mode federated")
    if local_steps is not None and epochs is not None:
        fail("--local-steps: instead of --epochs, not with it")
    if mode is Mode.federated:
        config = run_config_from_options(
            dataset, len(splits), epsilon=dp_epsilon, delta=dp_delta, noise_multiplier=dp_noise_multiplier,
            max_grad_norm=dp_max_grad_norm, rounds=rounds, local_epochs=epochs, local_steps=local_steps,
            learning_rate=learning_rate, batch_size=batch_size, weight_decay=weight_decay, strategy=strategy,
            proximal_mu=proximal_mu, server_learning_rate=server_learning_rate, trim_fraction=trim_fraction,
            secure_aggregation=secure_aggregation, seed=seed if seed is not None else get_training_defaults().seed)
        result = _train_federated(data, dataset, splits, settings, config)
        for hospital, withheld in _withheld_columns(result).items():
            warning = (f"round 0 withheld {withheld} column(s) (a category, or a feature not measured, of fewer than "
                       f"5 patients); the federation's standardisation and fill-in leave this hospital out of them")
            warn(hospital, warning)
            warnings.setdefault(hospital, []).append(warning)
    else:
        train_config = TrainConfig.for_task(get_training_defaults(), dataset, epochs=epochs,
                                            learning_rate=learning_rate, batch_size=batch_size,
                                            weight_decay=weight_decay, seed=seed)
        runner = run_pooled if mode is Mode.pooled else run_local
        with progress() as bars:
            hook = models_progress(bars, f"training {mode.value}", 1 if mode is Mode.pooled else len(splits))
            result = runner(dataset, splits, train_config, on_progress=hook)
    result.extra["excluded"] = left_out
    result.extra["warnings"] = warnings
    result.extra["model"] = dataset.model.model_dump(mode="json")
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                               stratify=settings.stratified_split)
    document = result.to_json()
    if reference is not None:
        document["reference"] = reference
    if json_output:
        print_json(document)
        return
    columns = {mode.value: result.to_json()}
    if reference is not None:
        columns = {"Bayes-optimal": reference, **columns}
    out.print(comparison_table(dataset, columns, title=f"{dataset.name}: {mode.value} training"))
    if dataset.task == "binary":
        out.print(clinical_table(document))
    if isinstance(timing := document.get("timing"), dict):
        out.print("timing: " + ", ".join(f"{k} {v}" for k, v in timing.items()))
    print_privacy(document.get("privacy"))


def _withheld_columns(result: ExperimentResult) -> dict[str, int]:
    """Hospital -> how many columns its round-0 statistics withheld as describing too few patients."""
    run = result.extra.get("run")
    suppressed = run.get("suppressed", {}) if isinstance(run, dict) else {}
    return {h: cells["categories"] for h, cells in suppressed.items() if cells.get("categories")}


def _train_federated(data: Path, dataset: DatasetSpec, splits: list[HospitalSplit], settings: Settings,
                     config: RunConfig) -> ExperimentResult:
    """The federation over loopback HTTP (a run that fails ends the command, exit 1), scored on every
    hospital's test rows."""
    from health_mlops.data.hospital import load_hospitals
    from health_mlops.experiments.loopback import run_federation_over_loopback
    from health_mlops.experiments.simulation import score_global_model

    hospitals = load_hospitals(data, dataset)
    with progress() as bars:
        task = bars.add_task("federated rounds", total=config.rounds + 2)
        outcome = run_federation_over_loopback(
            dataset, hospitals, config, split_seed=settings.split_seed, test_fraction=settings.test_fraction,
            stratify=settings.stratified_split,
            on_progress=lambda view: bars.update(task, completed=len(view.history), total=view.final_round + 1))
    assert outcome.run.preprocessing is not None  # the run completed (a failed one raised): round 0 closed
    result = score_global_model(dataset, splits, outcome.run.preprocessing, outcome.weights)
    result.extra["timing"] = outcome.timing.to_json()
    result.extra["run"] = {"id": outcome.run.id, "config": outcome.run.config.model_dump(mode="json"),
                           "selected_round": outcome.run.selected_round,
                           "validation_loss": outcome.run.validation_loss,
                           "rejected": outcome.run.rejected, "suppressed": outcome.run.suppressed,
                           "excluded": outcome.run.excluded}
    result.extra["privacy"] = privacy_json(outcome.run)
    return result


@app.command()
def evaluate(
    seeds: Annotated[str, typer.Option(help="generator seeds, each also its split seed: a range 1-5 or a list "
                                            "1,2,7")] = "1-5",
    hospitals: Hospitals = None,
    rows_per_hospital: RowsPerHospital = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="federated training rounds")] = None,
    json_output: JsonOption = False,
) -> None:
    """Pooled, local-only and federated training on the synthetic data of several seeds, scored on each hospital's
    test split (mean ± sd over seeds) and on its independent cohort of later patient-days (the mean over seeds, with
    its interval); then the README's claims, each ✓ or ✗, and exit code 1 if one fails. Federated rounds run in
    memory, with the services' coordinator and hospital code."""
    import tempfile

    import torch

    from health_mlops.experiments.seeds import MODES, PROBE_PATIENTS, TRAINED_MODES, evaluate_over_seeds

    chosen = seed_list(seeds)
    sizes = hospital_sizes(hospitals, rows_per_hospital, minimum=100)
    dataset = load_spec("health-risk")
    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    train_config = TrainConfig.for_task(get_training_defaults(), dataset)
    run_config = federated_run_config(dataset, len(sizes), rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="health-mlops-evaluate-") as scratch, progress() as bars:
        task = bars.add_task(f"{len(chosen)} seeds × pooled, local, federated", total=len(chosen))
        result = evaluate_over_seeds(chosen, Path(scratch), hospitals=len(sizes), rows_per_hospital=sizes,
                                     test_fraction=settings.test_fraction, stratify=settings.stratified_split,
                                     train_config=train_config, run_config=run_config,
                                     on_seed=lambda _seed: bars.advance(task))
    claims = result.claims()
    failed = [claim for claim, holds in claims.items() if not holds]
    if json_output:
        print_json(result.to_json())
        if failed:
            err.print(f"error: {len(failed)} of {len(claims)} claims failed on these seeds: {', '.join(failed)}",
                      markup=False)
            raise typer.Exit(1)
        return
    titles = {"federated": "federated", "pooled": "pooled", "local": "local-only", "bayes": "Bayes-optimal"}
    table = Table(title=f"AUC on each hospital's test split over seeds {seeds} (mean ± sd; patient-days "
                        f"{', '.join(str(rows) for rows in sizes)})")
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
    out.print(cohort_table(result.cohort.to_json(), title=f"mean over seeds {seeds}"))
    ranks = ", ".join(f"{titles[mode]} {cell(result.rank_summary(mode))}" for mode in TRAINED_MODES)
    out.print(f"Rank correlation (Spearman) of the risk with the true risk on {PROBE_PATIENTS} patients drawn across "
              f"the spec's ranges, each seed (local-only: mean over its hospitals' models): {ranks}")
    print_claims(claims)
    if failed:
        fail(f"{len(failed)} of {len(claims)} claims failed on these seeds: {', '.join(failed)}", code=1)
