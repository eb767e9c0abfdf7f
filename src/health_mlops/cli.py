"""The `health-mlops` command: one subcommand per job.

Human output is rich tables on stdout and progress bars on stderr; `--json` prints one JSON document on
stdout instead, for scripts. A file or spec that cannot be used ends the command with exit code 2 and a
message naming the file and the problem.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from health_mlops.config import Settings, get_settings, get_training_defaults
from health_mlops.data.diabetes import write_diabetes_sites
from health_mlops.data.hospital import HospitalData, load_hospitals
from health_mlops.data.io import DataError
from health_mlops.data.synthetic import SPEC_FILE_NAME, generate_dataset, read_reference
from health_mlops.data.validate import FileReport
from health_mlops.spec import DatasetSpec, SpecError, load_spec

if TYPE_CHECKING:  # training modules import torch; `data` commands should not pay for it
    from health_mlops.ml.baselines import HospitalSplit

app = typer.Typer(help="Health MLOps: federated health-risk models for hospital consortia.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Generate and validate hospital data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(highlight=False)
if not out.is_terminal:
    out.width = 120  # piped or captured output: rich's default of 80 columns truncates the tables
err = Console(stderr=True, highlight=False)

# How many quarantined rows a human-readable report lists per file (--json lists them all).
_ROWS_SHOWN = 10


class Mode(str, Enum):
    pooled = "pooled"
    local = "local"


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
    sys.stdout.write(json.dumps(document, indent=2, default=float) + "\n")


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
                                         test_fraction=settings.test_fraction)
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
) -> None:
    """Check every row against the spec; quarantine invalid rows (with line and reason), keep the rest."""
    settings = get_settings()
    with _clean_errors():
        dataset = _resolve_spec(spec, path)
        quality_dir = report_dir or settings.quality_dir / path.resolve().name
        hospitals = load_hospitals(path, spec=dataset, quality_dir=quality_dir)
    reports = _unique_reports(hospitals)
    if json_output:
        _print_json({"spec": dataset.name, "report_dir": str(quality_dir),
                     "hospitals": {h: {"rows_valid": d.rows_valid} for h, d in hospitals.items()},
                     "files": [r.model_dump(mode="json") for r in reports]})
        return
    for report in reports:
        _print_report(report)
    quarantined = sum(r.rows_quarantined for r in reports)
    out.print(f"{len(reports)} file(s), {sum(r.rows_valid for r in reports)} valid rows, {quarantined} quarantined; "
              f"reports and quarantined rows in {quality_dir}")


def _unique_reports(hospitals: dict[str, HospitalData]) -> list[FileReport]:
    # Hospitals split out of one multi-site file share that file's report.
    seen: dict[str, FileReport] = {}
    for data in hospitals.values():
        for report in data.reports:
            seen.setdefault(report.file, report)
    return list(seen.values())


def _load_splits(data: Path, dataset: DatasetSpec, settings: Settings) -> list[HospitalSplit]:
    from health_mlops.ml.baselines import split_hospitals

    hospitals = load_hospitals(data, dataset, quality_dir=settings.quality_dir / data.resolve().name)
    quarantined = sum(h.rows_quarantined for h in hospitals.values())
    if quarantined:
        err.print(f"{quarantined} invalid row(s) quarantined; see {settings.quality_dir / data.resolve().name}")
    return split_hospitals(hospitals, seed=settings.split_seed, test_fraction=settings.test_fraction)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="data root: one folder per hospital, or a file with a site column")],
    mode: Annotated[Mode, typer.Option(help="pooled: one model on all rows; local: one model per hospital")],
    spec: Annotated[str | None, typer.Option(help="built-in spec name or YAML path")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as one JSON object")] = False,
) -> None:
    """Train a baseline and score it on every hospital's test rows."""
    import torch

    from health_mlops.ml.baselines import run_local, run_pooled
    from health_mlops.ml.train import TrainConfig

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    with _clean_errors():
        dataset = _resolve_spec(spec, data)
        splits = _load_splits(data, dataset, settings)
    config = TrainConfig.for_task(get_training_defaults(), dataset, epochs=epochs, learning_rate=learning_rate,
                                  batch_size=batch_size)
    runner = run_pooled if mode is Mode.pooled else run_local
    total = config.epochs * (1 if mode is Mode.pooled else len(splits))
    with _progress() as progress:
        task = progress.add_task(f"training {mode.value}", total=total)
        result = runner(dataset, splits, config, on_epoch=lambda _name, _epoch: progress.advance(task))
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction)
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


def comparison_table(dataset: DatasetSpec, columns: dict[str, dict], *, title: str) -> Table:
    """Hospitals as rows, ways of training as columns, the task's primary metric in each cell."""
    metric = dataset.primary_metric
    table = Table(title=f"{title} ({metric.upper() if metric == 'auc' else 'R²'} on each hospital's test rows)")
    table.add_column("hospital")
    for name in columns:
        table.add_column(name, justify="right")
    hospitals = next(iter(columns.values()))["per_hospital"]
    for hospital_id in hospitals:
        table.add_row(hospital_id, *(f"{c['per_hospital'][hospital_id][metric]:.3f}" for c in columns.values()))
    table.add_section()
    table.add_row("[bold]overall[/]", *(f"[bold]{c['overall'][metric]:.3f}[/]" for c in columns.values()))
    return table


@app.command()
def demo(
    hospitals: Annotated[int, typer.Option(min=2, max=20)] = 5,
    rows_per_hospital: Annotated[int, typer.Option(min=100)] = 4000,
    seed: Annotated[int, typer.Option()] = 7,
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Generate data on first run, then train pooled and local-only baselines and compare them."""
    import torch

    from health_mlops.ml.baselines import run_local, run_pooled
    from health_mlops.ml.train import TrainConfig

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    data = settings.home / "data" / f"health-risk-h{hospitals}-n{rows_per_hospital}-s{seed}"
    if not (data / SPEC_FILE_NAME).is_file():
        with err.status(f"generating data into {data}"):
            generate_dataset(data, n_hospitals=hospitals, rows_per_hospital=rows_per_hospital, seed=seed,
                             split_seed=settings.split_seed, test_fraction=settings.test_fraction)
    with _clean_errors():
        dataset = _resolve_spec(None, data)
        splits = _load_splits(data, dataset, settings)
    config = TrainConfig.for_task(get_training_defaults(), dataset)
    with _progress() as progress:
        pooled_task = progress.add_task("pooled training", total=config.epochs)
        pooled = run_pooled(dataset, splits, config, on_epoch=lambda _h, _e: progress.advance(pooled_task))
        local_task = progress.add_task("local-only training", total=config.epochs * len(splits))
        local = run_local(dataset, splits, config, on_epoch=lambda _h, _e: progress.advance(local_task))
    reference = read_reference(data, split_seed=settings.split_seed, test_fraction=settings.test_fraction)
    columns: dict[str, dict] = {"pooled": pooled.to_json(), "local-only": local.to_json()}
    if reference is not None:
        columns["Bayes-optimal"] = reference
    if json_output:
        _print_json({"data": str(data), **columns})
        return
    out.print(comparison_table(dataset, columns, title="pooled vs local-only vs Bayes-optimal"))
    out.print(f"data: {data}")


if __name__ == "__main__":
    app()
