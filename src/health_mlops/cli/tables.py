"""How results read on a terminal: hospitals against ways of training, a binary model as a clinician reads it,
and a run's privacy."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.table import Table

from health_mlops.cli.output import out
from health_mlops.spec import DatasetSpec

if TYPE_CHECKING:
    from health_mlops.fl.messages import RunView


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
    table.add_row(f"[bold]mean over {len(hospitals)} hospitals[/]",
                  *(f"[bold]{_cell(c.get('mean_over_hospitals') or {}, metric)}[/]{_fewer(c, metric, len(hospitals))}"
                    for c in columns.values()))
    table.add_row("all test rows", *(_cell(c["overall"], metric) for c in columns.values()))
    return table


def _fewer(result: dict, metric: str, hospitals: int) -> str:
    """A mean over fewer hospitals than the table's says so: ` (over 3 of 4)`."""
    averaged = (result.get("hospitals_averaged") or {}).get(metric)
    return f" [dim](over {averaged} of {hospitals})[/]" if isinstance(averaged, int) and averaged < hospitals else ""


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
    hospitals = len(result["per_hospital"])
    averaged = result.get("hospitals_averaged") or {}
    fewer = {key for _, key in (("AUC", "auc"), *_CLINICAL_COLUMNS) if averaged.get(key, hospitals) < hospitals}
    label = f"mean over {hospitals} hospitals" + (f" ({', '.join(sorted(fewer))}: over fewer, where defined)"
                                                 if fewer else "")
    table.add_row(*row(label, result["mean_over_hospitals"]))
    return table


def privacy_json(view: RunView) -> dict[str, object] | None:
    """What `--json` says of a run's privacy: the largest ε over hospitals, δ, each hospital's ε and noise
    multiplier and batch, and the learning rate and sampling rate DP-SGD trained with (a private run's own defaults,
    unless given; no sampling rate: the batch was given, the same at every hospital)."""
    if view.privacy is None:
        return None
    return {"epsilon": view.privacy.epsilon, "delta": view.privacy.delta, "budget_epsilon": view.privacy.budget_epsilon,
            "hospitals": {h: p.epsilon for h, p in view.privacy.hospitals.items()},
            "noise_multiplier": {h: p.noise_multiplier for h, p in view.privacy.hospitals.items()},
            "batch_size": {h: p.batch_size for h, p in view.privacy.hospitals.items()},
            "learning_rate": view.config.learning_rate,
            "sampling_rate": view.config.privacy.sampling_rate if view.config.privacy else None}


def print_privacy(privacy: object) -> None:
    """The lines under a result trained with differential privacy (`privacy_json`; None without)."""
    if isinstance(privacy, dict):
        out.print(f"differential privacy: ε = {privacy['epsilon']:.2f} (the most any hospital spent; budget "
                  f"{privacy['budget_epsilon']:g}), δ = {privacy['delta']:g}", soft_wrap=True)
        per_hospital = ", ".join(f"{h} {n:.2f} (batch {privacy['batch_size'][h]})"
                                 for h, n in privacy["noise_multiplier"].items())
        rate = privacy["sampling_rate"]
        batches = "batch given" if rate is None else f"each hospital's batch {rate:g} of its training rows"
        out.print(f"  DP-SGD: learning rate {privacy['learning_rate']:g}, {batches} (a private run's own defaults "
                  f"unless given: HEALTH_MLOPS_TRAIN_DP_LEARNING_RATE, ..._DP_SAMPLING_RATE); noise multiplier per "
                  f"hospital: {per_hospital}", soft_wrap=True)


# What each claim says, in the order they are printed.
CLAIM_WORDS = {
    "cohort_federated_within_0.005_of_pooled": "federated mean AUC over hospitals ≥ pooled − 0.005 on the cohort",
    "cohort_federated_not_below_local_anywhere": "federated not below local-only beyond the interval at any hospital",
    "cohort_federated_above_local_at_small_hospitals": "federated above local-only beyond the interval at every "
                                                       "hospital under 1000 patient-days",
    "cohort_no_model_above_bayes": "no model above the Bayes-optimal risk beyond the interval",
    "federated_rank_correlation_at_least_0.6": "federated rank correlation with the true risk ≥ 0.6 across the spec's "
                                               "ranges",
}


def cohort_table(cohort: dict, *, title: str) -> Table:
    """Each hospital's independent cohort (`experiments.cohort`): every model's AUC (the federated model's with its
    interval), and the federated model's difference from local-only on the same patients, with its interval."""
    rows = next(iter(cohort["cohort_rows"].values()))
    table = Table(title=f"{title} (AUC on {rows} later patient-days of each hospital's city, never trained on; "
                        "95 % intervals)")
    for column in ("hospital (patient-days)", "federated", "pooled", "local-only", "Bayes-optimal",
                   "federated − local-only"):
        table.add_column(column, justify="left" if column.startswith("hospital") else "right")
    differences = cohort["differences"]["federated - local-only"]
    for hospital, size in cohort["rows_per_hospital"].items():
        change = differences[hospital]
        table.add_row(f"{hospital} ({size})", _cell(cohort["federated"]["per_hospital"][hospital], "auc"),
                      *(f"{cohort[mode]['per_hospital'][hospital]['auc']:.3f}"
                        for mode in ("pooled", "local-only", "Bayes-optimal")),
                      f"{change['auc']:+.4f} [dim]({change['low']:+.4f}, {change['high']:+.4f})[/]")
    table.add_section()
    table.add_row("[bold]mean over hospitals[/]",
                  *(f"[bold]{cohort[mode]['mean_over_hospitals']['auc']:.3f}[/]"
                    for mode in ("federated", "pooled", "local-only", "Bayes-optimal")), "")
    return table


def print_claims(claims: dict[str, bool]) -> None:
    for claim, holds in claims.items():
        out.print(f"{'✓' if holds else '✗'} {CLAIM_WORDS.get(claim, claim)}", markup=False)
