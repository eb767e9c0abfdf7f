"""The CLI's tables say what a mean over hospitals averages."""

from __future__ import annotations

from rich.console import Console

from health_mlops.cli.tables import clinical_table, comparison_table
from health_mlops.metrics import hospitals_averaged, mean_over_hospitals
from health_mlops.spec import load_spec


def rendered(table: object) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


def test_a_mean_over_fewer_hospitals_than_the_table_shows_says_how_many() -> None:
    """One AUC undefined (a test split of one outcome): the mean silently averaged 3 of 4 hospitals."""
    per_hospital = {f"hospital-{i}": {"auc": 0.8 + i / 100, "brier": 0.05} for i in range(1, 4)}
    per_hospital["hospital-4"] = {"auc": None, "brier": 0.04}
    result = {"mode": "federated", "per_hospital": per_hospital, "overall": {"auc": 0.8},
              "mean_over_hospitals": mean_over_hospitals(per_hospital),
              "hospitals_averaged": hospitals_averaged(per_hospital), "threshold": 0.1}
    assert result["hospitals_averaged"] == {"auc": 3, "brier": 4}
    text = rendered(comparison_table(load_spec("health-risk"), {"federated": result}, title="t"))
    assert "mean over 4 hospitals" in text and "(over 3 of 4)" in text
    clinical = rendered(clinical_table(result))
    assert "mean over 4 hospitals (auc: over fewer, where defined)" in clinical
    whole = {**result, "per_hospital": {h: m for h, m in per_hospital.items() if h != "hospital-4"}}
    whole["hospitals_averaged"] = hospitals_averaged(whole["per_hospital"])
    assert "over 3 of" not in rendered(comparison_table(load_spec("health-risk"), {"federated": whole}, title="t"))
