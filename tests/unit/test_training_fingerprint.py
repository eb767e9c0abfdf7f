"""A run's training fingerprint: equal for runs that trained the same model, different when anything that decides
the model differs (so `make demo` run twice registers one version, and a changed run always gets its own)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.state import Run
from health_mlops.fl.publish import training_fingerprint
from health_mlops.fl.run_config import RunConfig
from health_mlops.spec import load_spec, spec_to_yaml

SPEC = load_spec("health-risk")
CONFIG = RunConfig(rounds=1, local_epochs=1, min_hospitals=2)


def frames() -> list[pd.DataFrame]:
    rng = np.random.default_rng(4)
    return [generate_city_days(city, 200, rng).drop(columns="_risk") for city in CITIES[:2]]


def trained(parts: list[pd.DataFrame], config: RunConfig = CONFIG) -> Run:
    splits = [HospitalSplit(f"hospital-{i}", f.iloc[:160], f.iloc[160:]) for i, f in enumerate(parts, start=1)]
    return run_federated_in_memory(SPEC, splits, config)[1]


@pytest.fixture(scope="module")
def first() -> Run:
    return trained(frames())


def test_the_same_training_twice_has_one_fingerprint(first: Run) -> None:
    again = trained(frames())
    assert training_fingerprint(again, spec_to_yaml(SPEC)) == training_fingerprint(first, spec_to_yaml(SPEC))


def test_anything_that_decides_the_model_changes_the_fingerprint(first: Run) -> None:
    spec_yaml = spec_to_yaml(SPEC)
    reference = training_fingerprint(first, spec_yaml)
    one_row_less = frames()
    one_row_less[1] = one_row_less[1].drop(index=0)
    without_hospital_2 = [dataclasses.replace(r, hospitals={h: m for h, m in r.hospitals.items() if h != "hospital-2"})
                          if r.kind.value == "fit" else r for r in first.history]
    variants = {
        "another seed": training_fingerprint(trained(frames(), CONFIG.model_copy(update={"seed": 1})), spec_yaml),
        "another row": training_fingerprint(trained(one_row_less), spec_yaml),
        "a round without a hospital": training_fingerprint(dataclasses.replace(first, history=without_hospital_2),
                                                           spec_yaml),
        "another task": training_fingerprint(first, spec_yaml.replace("health-risk", "health-risk-2")),
    }
    assert all(fingerprint != reference for fingerprint in variants.values()), variants
    assert len(set(variants.values())) == len(variants)
