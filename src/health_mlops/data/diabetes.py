"""scikit-learn's diabetes data set (442 real patients) as five hospital sites.

The split is a fixed rule, not a random draw: a patient's site is the band their age falls in, with band
edges at the data set's age quintiles (36, 47, 53 and 60 years). Sites therefore differ in age and in
disease progression, as hospitals serving different populations do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_diabetes

from health_mlops.data.io import write_csv
from health_mlops.spec import SPEC_FILE_NAME, load_spec, spec_to_yaml

DATA_FILE_NAME = "diabetes.csv"
# Upper age (inclusive) of each site's band; the last band is open-ended.
AGE_BAND_UPPER_EDGES = (36, 47, 53, 60)


@dataclass(frozen=True)
class SiteSummary:
    hospital_id: str
    ages: str
    rows: int
    mean_progression: float


def site_of_age(age: np.ndarray) -> np.ndarray:
    """hospital-1 for ages up to 36, hospital-2 for 37-47, ..., hospital-5 for 61 and over."""
    band = np.searchsorted(np.asarray(AGE_BAND_UPPER_EDGES), age, side="left")
    return np.array([f"hospital-{b + 1}" for b in band])


def diabetes_frame() -> pd.DataFrame:
    """The data set as the spec names its columns, in its original units (read from scikit-learn's package)."""
    raw = load_diabetes(scaled=False, as_frame=True).frame
    frame = raw.rename(columns={"target": "progression"})
    frame["age"] = frame["age"].astype(int)
    frame["sex"] = frame["sex"].astype(int).astype(str)
    return frame


def write_diabetes_sites(out: Path) -> list[SiteSummary]:
    """Write `out/hospital-k/diabetes.csv` and `out/spec.yaml`."""
    frame = diabetes_frame()
    sites = site_of_age(frame["age"].to_numpy())
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE_NAME).write_text(spec_to_yaml(load_spec("diabetes")), encoding="utf-8")
    summaries = []
    for hospital_id in sorted(set(sites)):
        rows = frame[sites == hospital_id]
        folder = out / hospital_id
        folder.mkdir(exist_ok=True)
        write_csv(rows, folder / DATA_FILE_NAME)
        summaries.append(SiteSummary(str(hospital_id), f"{rows['age'].min()}-{rows['age'].max()}", len(rows),
                                     float(rows["progression"].mean())))
    return summaries
