"""`demo`: the whole federation on loopback, compared with the baselines, then the dashboard (`health_mlops.demo`
does the work; this is its command line and its printout)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from health_mlops.cli.app import app
from health_mlops.cli.data import load_splits
from health_mlops.cli.options import (DpClip, DpDelta, DpEpsilon, DpNoise, Hospitals, JsonOption, RowsPerHospital,
                                      SecureAggregation, hospital_sizes, run_config_from_options)
from health_mlops.cli.output import err, fail, models_progress, out, print_json, progress
from health_mlops.cli.tables import cohort_table, comparison_table, print_claims, print_privacy, privacy_json
from health_mlops.config import get_settings
from health_mlops.spec import SPEC_FILE_NAME, DatasetSpec, spec_for_data

if TYPE_CHECKING:
    from health_mlops.fl.messages import RunView


@app.command()
def demo(
    hospitals: Hospitals = None,
    rows_per_hospital: RowsPerHospital = None,
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
    secure_aggregation: SecureAggregation = False,
    json_output: JsonOption = False,
) -> None:
    """The whole federation on loopback: aggregator and nodes as processes, trained live, compared with pooled
    and local-only training and the Bayes-optimal score; then the champion is served until Ctrl-C."""
    import torch

    from health_mlops.data.synthetic import generate_dataset, hospital_ids
    from health_mlops.demo.comparison import compare_with_baselines
    from health_mlops.demo.federation import (Ports, demo_login, node_plan, node_status_urls, run_federation,
                                              serve_dashboard)
    from health_mlops.demo.processes import Processes, check_ports_free
    from health_mlops.demo.prometheus import start_prometheus
    from health_mlops.experiments.loopback import round_overheads_ms
    from health_mlops.fl.messages import RunRequest
    from health_mlops.trust.credentials import provision as issue

    settings = get_settings()
    torch.set_num_threads(settings.torch_threads)
    sizes = hospital_sizes(hospitals, rows_per_hospital, minimum=100)
    if not 2 <= len(sizes) <= 20:
        fail(f"--hospitals: a demo federates 2 to 20 hospitals, not {len(sizes)}")
    hospitals = len(sizes)
    data = settings.home / "data" / f"health-risk-n{'-'.join(str(rows) for rows in sizes)}-s{seed}"
    if not (data / SPEC_FILE_NAME).is_file():
        with err.status(f"generating data into {data}"):
            generate_dataset(data, n_hospitals=hospitals, rows_per_hospital=sizes, seed=seed,
                             split_seed=settings.split_seed, test_fraction=settings.test_fraction,
                             stratify=settings.stratified_split)
    names = hospital_ids(hospitals)
    issued = issue(settings.credentials_dir, names)
    if issued:
        err.print(f"issued credentials for {', '.join(issued)} in {settings.credentials_dir}", markup=False)
    dataset = spec_for_data(None, data)
    splits, _, _ = load_splits(data, dataset, settings)
    reference_file = json.loads((data / "reference.json").read_text(encoding="utf-8"))
    request = RunRequest(config=run_config_from_options(dataset, hospitals, epsilon=dp_epsilon, delta=dp_delta,
                                                        noise_multiplier=dp_noise_multiplier,
                                                        max_grad_norm=dp_max_grad_norm, rounds=rounds,
                                                        secure_aggregation=secure_aggregation),
                         hospitals=names)
    ports = Ports(port, ops_port, node_api_port, node_metrics_port)
    serve = not (no_serve or json_output)
    try:
        if serve:
            check_ports_free([dashboard_port, prometheus_port])  # fail now, not after training
        # Every process lives until the demo ends: after training, the dashboard shows the federation live.
        environment = {**os.environ, "HEALTH_MLOPS_HOME": str(settings.home),
                       "HEALTH_MLOPS_AGGREGATOR_URL": f"https://127.0.0.1:{port}"}
        with Processes(settings.home / "logs", environment) as processes:
            prometheus_url = None
            plan = node_plan(data, names, reference_file.get("cities", {}))
            if serve:
                nodes = [(p.hospital_id, p.node_id) for p in plan]
                prometheus_url = start_prometheus(processes, settings, ports, nodes, dashboard_port, prometheus_port,
                                                  err)
            view, body = run_federation(processes, data=data, hospitals=names,
                                        cities=reference_file.get("cities", {}), request=request, home=settings.home,
                                        credentials_dir=settings.credentials_dir, ports=ports,
                                        metric=dataset.primary_metric, console=err, plan=plan)
            with progress() as bars:
                columns, counted, cohort = compare_with_baselines(dataset, splits, data, view, body, settings,
                                                                  partial(models_progress, bars))
            if json_output:
                print_json({"data": str(data), "run": {"id": view.id, "rounds": view.config.rounds,
                                                       "rejected": view.rejected, "counted_from": counted,
                                                       "suppressed": view.suppressed},
                            "privacy": privacy_json(view), "model": view.model,
                            "round_overhead_ms": round_overheads_ms(view), **columns,
                            **({"cohort": cohort} if cohort is not None else {})})
                return
            _print_outcome(dataset, columns, cohort, view, counted, names[0], data)
            if serve:
                serve_dashboard(processes, dashboard_port, err, prometheus_url=prometheus_url,
                                node_status_urls=node_status_urls(plan, ports),
                                login=demo_login(settings.dashboard_accounts, settings.credentials_dir))
    except KeyboardInterrupt:
        err.print("interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None


def _print_outcome(dataset: DatasetSpec, columns: dict[str, dict], cohort: dict | None, view: RunView,
                   counted: dict[str, list[str]], first: str, data: Path) -> None:
    out.print(comparison_table(dataset, columns, title="federated vs pooled vs local-only vs Bayes-optimal"))
    if cohort is not None:
        out.print(cohort_table(cohort, title="the same models on each hospital's independent cohort"))
        claims = cohort["claims"]
        assert isinstance(claims, dict)
        print_claims(claims)
    out.print(f"run {view.id}: {view.config.rounds} rounds, each hospital counted once per round "
              f"({first}'s results came from {', '.join(counted[first])}); data: {data}", soft_wrap=True, markup=False)
    print_privacy(privacy_json(view))
    model = view.model or {}
    if model.get("status") in ("registered", "unchanged"):
        said = ("registered" if model["status"] == "registered" else
                f"unchanged: this run trained as {model['federation_run']} did (same code, task, settings and data)")
        out.print(f"model: {dataset.name} v{model['version']} {said}, {', '.join(model['aliases']) or 'no alias'} "
                  f"({model['metric_name']} {model['metric']:.4f} by federated evaluation: the first table's federated "
                  f"mean over hospitals, each scoring it on its own test split); "
                  f"`health-mlops registry list` shows every version", soft_wrap=True)
    else:
        out.print(f"model: not registered ({model.get('reason', 'unknown')})", markup=False)
