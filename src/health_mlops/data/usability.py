"""Whether each hospital's data can take part in training, and what a user should know before it does.

A hospital with no valid rows cannot take part: it is left out, with the reason, in every mode (pooled, local and
federated), never a traceback or a server error. One whose valid rows hold a single outcome class can, with a
warning: in a federation or a pooled model its rows still teach what that class looks like, but a model of its own
learns one answer, and any AUC on its rows is undefined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from health_mlops.data.hospital import HospitalData
from health_mlops.data.split import MIN_VALIDATION_ROWS, HospitalSplit, holds_validation
from health_mlops.metrics import MIN_EVENTS_FOR_SLOPE
from health_mlops.spec import DatasetSpec


@dataclass(frozen=True)
class SiteAssessment:
    hospital: str
    rows_valid: int
    rows_quarantined: int
    excluded: str | None  # why the hospital cannot take part; None if it can
    warnings: tuple[str, ...] = ()
    missing_values: Mapping[str, int] = field(default_factory=dict)  # valid rows "not measured", per feature

    def to_json(self) -> dict[str, object]:
        return {"rows_valid": self.rows_valid, "rows_quarantined": self.rows_quarantined,
                "missing_values": dict(self.missing_values), "excluded": self.excluded, "warnings": list(self.warnings)}


def assess_site(data: HospitalData, spec: DatasetSpec) -> SiteAssessment:
    """What stands in the way of one hospital's data, if anything."""
    valid, quarantined = data.rows_valid, data.rows_quarantined
    if valid == 0:
        why = f"all {quarantined} rows invalid (quarantined)" if quarantined else "no rows"
        return SiteAssessment(data.hospital_id, valid, quarantined, f"no valid rows: {why}")
    missing = {f.name: int(n) for f in spec.features if (n := data.frame[f.name].isna().sum())}
    warnings = []
    if spec.task == "binary":
        classes = sorted(int(c) for c in data.frame[spec.target.name].unique())
        if len(classes) == 1:
            warnings.append(f"every valid row has {spec.target.name} = {classes[0]}: a model of its own learns one "
                            f"answer, and an AUC on its rows is undefined")
    for name, n in missing.items():
        if n == valid:
            warnings.append(f"{name} is never measured here: it is filled in with the other hospitals' "
                            f"{'mean' if spec.by_name[name].type == 'numeric' else 'most common value'}")
    return SiteAssessment(data.hospital_id, valid, quarantined, None, tuple(warnings), missing)


def assess_sites(hospitals: Mapping[str, HospitalData], spec: DatasetSpec) -> dict[str, SiteAssessment]:
    return {hospital_id: assess_site(data, spec) for hospital_id, data in hospitals.items()}


def usable(hospitals: Mapping[str, HospitalData], assessments: Mapping[str, SiteAssessment]
           ) -> dict[str, HospitalData]:
    """The hospitals that can take part."""
    return {h: data for h, data in hospitals.items() if assessments[h].excluded is None}


def excluded(assessments: Mapping[str, SiteAssessment]) -> dict[str, str]:
    """Hospital -> why it is left out."""
    return {h: a.excluded for h, a in assessments.items() if a.excluded is not None}


def size_warnings(split: HospitalSplit, spec: DatasetSpec, *, validation_fraction: float) -> list[str]:
    """What a hospital's split is too small for, and what happens to it then: its test rows (none, or one
    outcome), its events (too few for a model of its own), its validation rows (too few to hold out)."""
    found = [w] if (w := warning_about_test_rows(split.test, spec)) is not None else []
    train = split.train
    if spec.task == "binary" and len(train):
        events = int(train[spec.target.name].astype(int).sum())
        fewer = min(events, len(train) - events)
        if 0 < fewer < MIN_EVENTS_FOR_SLOPE:
            outcome = "have the event" if events == fewer else "are without the event"
            found.append(f"only {fewer} of its {len(train)} training rows {outcome}: too few for a model of its own "
                         f"(local-only) to learn from, and for its recalibration's slope (an intercept only); a "
                         f"federation or a pooled model still learns from them")
    if validation_fraction > 0 and not holds_validation(len(train), validation_fraction):
        found.append(f"{len(train)} training rows are too few to hold out {MIN_VALIDATION_ROWS} validation rows: "
                     f"it trains on all of them, without early stopping, and its rows take no part in choosing "
                     f"the federation's round")
    return found


def warning_about_test_rows(test: pd.DataFrame, spec: DatasetSpec) -> str | None:
    """What a hospital's test rows cannot measure, if anything: none, or a single outcome class (binary tasks)."""
    if test.empty:
        return "no test rows: too small to test on; its metrics are undefined (null)"
    if spec.task == "binary" and test[spec.target.name].nunique() == 1:
        value = int(test[spec.target.name].iloc[0])
        return (f"its {len(test)} test rows all have {spec.target.name} = {value}: too few to test on; its AUC is "
                f"undefined (null)")
    return None
