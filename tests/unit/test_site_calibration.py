"""Site recalibration: each hospital corrects the federated model's risks to its own patients, on its own
validation rows; the report shows both, and the served model answers either."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from health_mlops.data.split import HospitalSplit
from health_mlops.data.synthetic import CITIES, generate_city_days
from health_mlops.experiments.simulation import run_federated_in_memory
from health_mlops.fl.publish import site_calibrations
from health_mlops.fl.report import model_report
from health_mlops.fl.run_config import RunConfig
from health_mlops.ml.onnx import export_onnx, stored_site_calibrations
from health_mlops.metrics import MIN_EVENTS_FOR_SLOPE
from health_mlops.ml.site_calibration import fit_site_calibration
from health_mlops.spec import load_spec

SPEC = load_spec("health-risk")


def test_a_site_whose_risks_are_shifted_gets_the_shift_back() -> None:
    rng = np.random.default_rng(0)
    model_logit = rng.normal(-1.0, 1.5, 20_000)
    truth = 1 / (1 + np.exp(-(0.8 + 0.6 * model_logit)))  # the site: sicker, and the model too sure
    outcome = (rng.random(len(truth)) < truth).astype(float)
    calibration = fit_site_calibration(outcome, 1 / (1 + np.exp(-model_logit)))
    assert calibration is not None
    assert calibration.intercept == pytest.approx(0.8, abs=0.08) and calibration.slope == pytest.approx(0.6, abs=0.05)
    risks = 1 / (1 + np.exp(-model_logit[:100]))
    assert np.array_equal(np.argsort(calibration.apply(risks)), np.argsort(risks))  # the ranking is kept


def test_a_site_with_few_events_fits_only_its_event_rate_and_one_outcome_fits_nothing() -> None:
    risk = np.full(60, 0.02)
    outcome = np.zeros(60)
    outcome[:MIN_EVENTS_FOR_SLOPE - 1] = 1  # 9 events in 60: 15 %, where the model says 2 %
    calibration = fit_site_calibration(outcome, risk)
    assert calibration is not None and calibration.slope == 1.0
    assert calibration.apply(risk).mean() == pytest.approx(outcome.mean(), rel=1e-6)
    assert fit_site_calibration(np.zeros(60), risk) is None


def test_each_hospital_recalibrates_the_federated_model_and_the_report_and_export_carry_it() -> None:
    rng = np.random.default_rng(3)
    frames = [generate_city_days(city, 1000, rng).drop(columns="_risk") for city in CITIES]
    splits = [HospitalSplit(f"hospital-{i}", f.iloc[:800], f.iloc[800:]) for i, f in enumerate(frames, start=1)]
    _, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=3, local_steps=20, min_hospitals=5))
    report = model_report(run, SPEC)
    assert set(report["site_calibration"]) == set(report["per_hospital_calibrated"])
    assert set(report["per_hospital_calibrated"]) <= set(report["per_hospital"])
    sites = site_calibrations(run, SPEC)
    assert sites and all(c.threshold is not None and 0 < c.threshold < 1 for c in sites.values())
    for hospital, calibration in sites.items():
        fitted = report["site_calibration"][hospital]
        assert (calibration.intercept, calibration.slope) == (fitted["intercept"], fitted["slope"])
        events = pd.concat([s.train for s in splits if s.hospital_id == hospital])[SPEC.target.name].astype(int)
        assert calibration.threshold == pytest.approx(events.mean())  # flagged above its own event rate
    assert run.preprocessing is not None
    stored = stored_site_calibrations(export_onnx(SPEC, run.preprocessing, run.weights, sites=sites))
    assert stored == sites


def test_a_hospital_whose_patients_the_federation_serves_worse_than_its_own_model_is_told_so() -> None:
    """hospital-5's outcome follows its own rule (the hot days, not the generator's risk): no recalibration of the
    federation's model fits it, and its own logistic regression does."""
    rng = np.random.default_rng(4)
    frames = [generate_city_days(city, 1000, rng).drop(columns="_risk") for city in CITIES]
    odd = frames[4]
    odd[SPEC.target.name] = (odd["temperature"] > odd["temperature"].quantile(0.8)).astype(int).astype(str)
    splits = [HospitalSplit(f"hospital-{i}", f.iloc[:800], f.iloc[800:]) for i, f in enumerate(frames, start=1)]
    _, run = run_federated_in_memory(SPEC, splits, RunConfig(rounds=3, local_steps=20, min_hospitals=5))
    report = model_report(run, SPEC)
    assert "hospital-5" in report["local_comparison"]
    compared = report["local_comparison"]["hospital-5"]
    assert compared["local_loss"] < compared["federated_loss"]
    told = report["local_better"]["hospital-5"]
    assert "hospital-5's own logistic regression fits its validation rows better" in told
