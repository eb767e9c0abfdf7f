"""`data generate` and `data validate`; and the hospitals a training command can use (`load_splits`)."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from health_mlops.cli.app import data_app
from health_mlops.cli.options import Hospitals, JsonOption, RowsPerHospital, SpecOption, hospital_sizes
from health_mlops.cli.output import err, fail, out, print_json, warn
from health_mlops.config import Settings, get_settings, get_training_defaults
from health_mlops.errors import SpecError
from health_mlops.spec import DatasetSpec, spec_for_data

if TYPE_CHECKING:  # pandas and the data code load only in the commands that read data
    from health_mlops.data.hospital import HospitalData
    from health_mlops.data.usability import SiteAssessment
    from health_mlops.data.validate import FileReport
    from health_mlops.data.split import HospitalSplit

# How many quarantined rows a human-readable report lists per file (--json lists them all).
ROWS_SHOWN = 10


@data_app.command("generate")
def data_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write hospital-1 ... hospital-N into")],
    hospitals: Hospitals = None,
    rows_per_hospital: RowsPerHospital = None,
    seed: Annotated[int, typer.Option(help="generator seed: the same seed writes the same files")] = 0,
    spec: Annotated[str, typer.Option(
        help="health-risk (synthetic) or diabetes (scikit-learn's real data)")] = "health-risk",
    json_output: JsonOption = False,
) -> None:
    """Write one data folder per hospital, with the spec (and for synthetic data, the Bayes-optimal scores)."""
    if spec == "diabetes":
        from health_mlops.data.diabetes import write_diabetes_sites

        sites = write_diabetes_sites(out_dir)
        if json_output:
            print_json([asdict(s) for s in sites])
            return
        table = Table(title=f"diabetes data set by age band → {out_dir}")
        for column in ("hospital", "ages", "rows", "mean progression"):
            table.add_column(column, justify="left" if column == "hospital" else "right")
        for site in sites:
            table.add_row(site.hospital_id, site.ages, str(site.rows), f"{site.mean_progression:.1f}")
        out.print(table)
        return
    if spec != "health-risk":
        raise SpecError(f"{spec}: data generate writes the built-in tasks only (health-risk or diabetes)")
    from health_mlops.data.synthetic import generate_dataset

    settings = get_settings()
    sizes = hospital_sizes(hospitals, rows_per_hospital, minimum=10)
    with err.status(f"generating {sum(sizes)} patient-days at {len(sizes)} hospitals"):
        summaries = generate_dataset(out_dir, n_hospitals=len(sizes), rows_per_hospital=sizes,
                                     seed=seed, split_seed=settings.split_seed,
                                     test_fraction=settings.test_fraction, stratify=settings.stratified_split)
    if json_output:
        print_json([asdict(s) for s in summaries])
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
    out.print(f"[bold]{escape(report.file)}[/]: {report.rows_read} rows read, {report.rows_valid} valid, {status}")
    if report.ignored_columns:
        out.print(f"  columns not in the spec, ignored: {', '.join(report.ignored_columns)}", markup=False)
    if report.missing_values:
        counts = ", ".join(f"{name} {n}" for name, n in report.missing_values.items())
        out.print(f"  not measured, filled in for training: {counts}", markup=False)
    for q in report.quarantined[:ROWS_SHOWN]:
        out.print(f"  line {q.line}: {q.summary}", markup=False)
    if report.rows_quarantined > ROWS_SHOWN:
        out.print(f"  ... and {report.rows_quarantined - ROWS_SHOWN} more (all in the report file)")


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="a data file, a hospital folder, or a folder of hospital folders")],
    spec: SpecOption = None,
    report_dir: Annotated[Path | None, typer.Option(help="where reports and quarantined rows go")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print every file's report as JSON")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="exit 2 when any hospital is left out or warned "
                                                          "about")] = False,
) -> None:
    """Check every row against the spec; quarantine invalid rows (with line and reason), keep the rest; say which
    hospitals cannot take part in training and why. Exit 0: every hospital usable; 1: usable, with hospitals left
    out or warnings; 2: no hospital usable (or, with --strict, any of these)."""
    from health_mlops.data.hospital import load_hospitals
    from health_mlops.data.usability import assess_sites

    settings = get_settings()
    dataset = spec_for_data(spec, path)
    quality_dir = report_dir or settings.quality_dir / path.resolve().name
    hospitals = load_hospitals(path, spec=dataset, quality_dir=quality_dir)
    reports = _unique_reports(hospitals)
    _, sites = _split_with_size_warnings(hospitals, assess_sites(hospitals, dataset), dataset, settings)
    flagged = [a for a in sites.values() if a.excluded or a.warnings]
    usable = [a for a in sites.values() if a.excluded is None]
    code = 2 if not usable or (strict and flagged) else 1 if flagged else 0
    if json_output:
        print_json({"spec": dataset.name, "report_dir": str(quality_dir),
                    "hospitals": {h: a.to_json() for h, a in sites.items()},
                    "files": [r.model_dump(mode="json") for r in reports], "exit_code": code})
    else:
        for report in reports:
            _print_report(report)
        quarantined = sum(r.rows_quarantined for r in reports)
        out.print(f"{len(reports)} file(s), {sum(r.rows_valid for r in reports)} valid rows, {quarantined} "
                  f"quarantined; reports and quarantined rows in {quality_dir}", markup=False)
        for assessment in flagged:
            print_site(assessment)
        if not usable:
            err.print("[bold red]error:[/] no hospital has data that can be trained on", markup=True)
    if code:
        raise typer.Exit(code)


def _split_with_size_warnings(hospitals: dict[str, HospitalData], sites: dict[str, SiteAssessment],
                              dataset: DatasetSpec, settings: Settings
                              ) -> tuple[list[HospitalSplit], dict[str, SiteAssessment]]:
    """The usable hospitals' splits as `train` makes them, and every site's assessment with what its split is too
    small for."""
    from health_mlops.data.split import split_hospitals
    from health_mlops.data.usability import size_warnings, usable

    fraction = get_training_defaults().validation_fraction
    splits = split_hospitals(usable(hospitals, sites), dataset, seed=settings.split_seed,
                             test_fraction=settings.test_fraction, stratify=settings.stratified_split)
    return splits, {**sites, **{s.hospital_id: replace(sites[s.hospital_id], warnings=(
        *sites[s.hospital_id].warnings, *size_warnings(s, dataset, validation_fraction=fraction))) for s in splits}}


def print_site(assessment: SiteAssessment) -> None:
    if assessment.excluded is not None:
        err.print(f"[bold yellow]{escape(assessment.hospital)}[/]: left out of training: "
                  f"{escape(assessment.excluded)}", markup=True, soft_wrap=True)
    for warning in assessment.warnings:
        warn(assessment.hospital, warning)


def _unique_reports(hospitals: dict[str, HospitalData]) -> list[FileReport]:
    # Hospitals split out of one multi-site file share that file's report.
    seen: dict[str, FileReport] = {}
    for data in hospitals.values():
        for report in data.reports:
            seen.setdefault(report.file, report)
    return list(seen.values())


def load_splits(data: Path, dataset: DatasetSpec, settings: Settings
                ) -> tuple[list[HospitalSplit], dict[str, str], dict[str, list[str]]]:
    """The train/test split of every hospital that can take part, those left out with the reason, and warnings
    about the others (each said on stderr); no usable hospital ends the command (exit 2)."""
    from health_mlops.data.hospital import load_hospitals
    from health_mlops.data.usability import assess_sites, excluded, usable

    hospitals = load_hospitals(data, dataset, quality_dir=settings.quality_dir / data.resolve().name)
    quarantined = sum(h.rows_quarantined for h in hospitals.values())
    if quarantined:
        err.print(f"{quarantined} invalid row(s) quarantined; see {settings.quality_dir / data.resolve().name}",
                  markup=False)
    sites = assess_sites(hospitals, dataset)
    if not usable(hospitals, sites):
        for assessment in sites.values():
            print_site(assessment)
        fail("no hospital has data that can be trained on")
    splits, sites = _split_with_size_warnings(hospitals, sites, dataset, settings)
    for assessment in sites.values():
        print_site(assessment)
    warnings = {s.hospital_id: list(sites[s.hospital_id].warnings) for s in splits}
    return splits, excluded(sites), {h: w for h, w in warnings.items() if w}
