"""Synthetic multi-city patient-days from a causal model, with the true risk of every row known.

The causal chain, per patient-day:

1. The city sets the day's environment: temperature and humidity follow its climate and the season, PM2.5
   rises with winter heating, ozone with summer sun, and influenza circulates in a winter flu season.
2. The city's population sets the patient: age, sex, BMI, smoking, and conditions that depend on them
   (asthma/COPD on smoking, diabetes on BMI and age, cardiovascular disease on age, diabetes and smoking).
3. Exposures times vulnerabilities raise an unobserved acute state: pollution hurts patients with asthma or
   COPD most, heat and cold hurt cardiac patients most, flu hurts the old and the asthmatic.
4. Physiology responds to that state: heart rate, respiratory rate and temperature go up, SpO2, steps and
   sleep go down, each with its own day-to-day variation. The wearable records these values.
5. The event (respiratory or cardiac ER visit or admission within 7 days) is drawn with a probability set
   by what the body shows (the recorded physiology, with a steep rise below SpO2 92 %) and by exposure
   times vulnerability.

Because the event depends on the unobserved state only through what is recorded, the event probability is
a function of the observed features alone: it is the Bayes-optimal predictor, and its scores on the test
rows are the best any model can reach. Hospitals differ (non-IID) in climate, pollution and population,
while the mechanism (P(event | features)) is the same everywhere, as it is for real patients.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from health_mlops.data.io import write_csv
from health_mlops.data.split import split_frame
from health_mlops.metrics import binary_metrics, mean_over_hospitals, weighted_auc
from health_mlops.spec import SPEC_FILE_NAME, DatasetSpec, load_spec, spec_to_yaml

DATA_FILE_NAME = "patient_days.csv"
REFERENCE_FILE_NAME = "reference.json"


@dataclass(frozen=True)
class City:
    """A city's climate, pollution and population."""

    name: str
    temperature_mean: float  # °C, annual mean
    temperature_amplitude: float  # °C, half the summer-winter difference
    humidity: float  # %, annual mean
    pm25: float  # µg/m³, summer baseline
    winter_pm_factor: float  # extra PM2.5 in mid-winter from heating, as a fraction of the baseline
    no2: float  # µg/m³, traffic baseline
    o3: float  # µg/m³, baseline before summer photochemistry
    flu_peak: float  # influenza activity at the height of the season, 0..1.5
    age_mean: float
    bmi_mean: float
    p_asthma_copd: float
    p_diabetes: float
    p_cardiovascular: float
    smoking: tuple[float, float, float]  # never, former, current


# Five cities chosen to differ on every axis that drives risk.
CITIES: tuple[City, ...] = (
    City("Riverton", 12.0, 10.0, 68.0, 10.0, 0.8, 30.0, 55.0, 1.0, 46.0, 26.5, 0.09, 0.08, 0.07, (0.62, 0.22, 0.16)),
    City("Ashford", 10.0, 11.0, 72.0, 12.0, 1.0, 32.0, 45.0, 1.0, 49.0, 28.5, 0.12, 0.11, 0.10, (0.58, 0.22, 0.20)),
    City("Solana", 20.0, 9.0, 32.0, 12.0, 0.3, 30.0, 80.0, 0.6, 54.0, 27.0, 0.07, 0.12, 0.11, (0.60, 0.28, 0.12)),
    City("Nordhavn", 5.0, 13.0, 78.0, 11.0, 1.3, 22.0, 50.0, 0.9, 45.0, 26.0, 0.10, 0.07, 0.08, (0.58, 0.24, 0.18)),
    City("Baymouth", 17.0, 5.0, 85.0, 8.0, 0.4, 24.0, 45.0, 1.1, 50.0, 26.0, 0.20, 0.05, 0.04, (0.70, 0.16, 0.14)),
)

# Baseline log-odds of the event: with the cities above, about 1.3 % to 5 % of patient-days end in an event
# (rare, as acute events are; it is also what keeps a single hospital short of events to learn from).
_EVENT_INTERCEPT = -5.8


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def _aqi(concentration: np.ndarray, breakpoints: Sequence[tuple[float, float]]) -> np.ndarray:
    """US EPA sub-index: piecewise linear between (concentration, index) breakpoints."""
    conc, index = zip(*breakpoints, strict=True)
    return np.interp(concentration, conc, index)


_PM25_AQI = [(0.0, 0), (9.0, 50), (35.4, 100), (55.4, 150), (125.4, 200), (225.4, 300), (325.4, 500)]
_PM10_AQI = [(0.0, 0), (54.0, 50), (154.0, 100), (254.0, 150), (354.0, 200), (424.0, 300), (604.0, 500)]
_O3_PPB_AQI = [(0.0, 0), (54.0, 50), (70.0, 100), (85.0, 150), (105.0, 200), (200.0, 300), (400.0, 500)]
_O3_UG_PER_PPB = 1.96


def true_risk(frame: pd.DataFrame) -> np.ndarray:
    """P(event within 7 days | recorded features): the mechanism every hospital shares.

    Reads only columns that are in the data, which is what makes it Bayes-optimal.
    """
    age_z = (frame["age"].to_numpy() - 50.0) / 15.0
    older = np.maximum(age_z, 0.0)
    asthma = frame["asthma_copd"].astype(int).to_numpy()
    cardio = frame["cardiovascular"].astype(int).to_numpy()
    diabetes = frame["diabetes"].astype(int).to_numpy()
    current_smoker = (frame["smoker"].to_numpy() == "current").astype(float)
    spo2 = frame["spo2"].to_numpy()
    distress = (
        0.45 * (frame["heart_rate"].to_numpy() - 72.0) / 9.0
        + 0.55 * (96.0 - spo2) / 1.4
        + 0.50 * (frame["body_temperature"].to_numpy() - 36.9) / 0.45
        + 0.50 * (frame["respiratory_rate"].to_numpy() - 16.0) / 2.5
        - 0.30 * (np.log1p(frame["steps"].to_numpy()) - 8.5) / 0.6
        - 0.20 * (frame["sleep_hours"].to_numpy() - 7.0) / 1.2
    )
    hypoxia = np.maximum(92.5 - spo2, 0.0)
    fever = np.maximum(frame["body_temperature"].to_numpy() - 37.3, 0.0) / 0.4
    pollution = np.maximum((frame["pm25"].to_numpy() - 12.0) / 15.0 + 0.5 * (frame["no2"].to_numpy() - 30.0) / 20.0, 0)
    temperature = frame["temperature"].to_numpy()
    thermal = np.maximum(temperature - 27.0, 0.0) / 4.0 + 0.5 * np.maximum(3.0 - temperature, 0.0) / 6.0
    respiratory_vulnerability = 0.05 + 1.3 * asthma + 0.4 * current_smoker + 0.2 * older
    cardiac_vulnerability = 0.05 + 1.2 * cardio + 0.4 * diabetes + 0.3 * older
    logit = (
        _EVENT_INTERCEPT
        + 0.3 * distress
        + 0.8 * hypoxia
        + 0.6 * fever * (asthma + older)
        + 1.2 * respiratory_vulnerability * pollution
        + 1.2 * cardiac_vulnerability * thermal
        + 0.4 * older**2 + 0.3 * cardio + 0.3 * asthma + 0.2 * diabetes
        + 0.3 * asthma * (frame["humidity"].to_numpy() - 60.0) / 20.0
    )
    return _sigmoid(logit)


def generate_city_days(city: City, n_rows: int, rng: np.random.Generator) -> pd.DataFrame:
    """`n_rows` patient-days of one city, each a different patient on a random day of one year."""
    day = rng.integers(0, 365, n_rows)
    season = np.cos(2 * np.pi * (day - 196) / 365)  # +1 in mid-July, -1 in mid-January
    winter, summer = np.maximum(-season, 0.0), np.maximum(season, 0.0)
    days_from_flu_peak = np.minimum(np.abs(day - 25), 365 - np.abs(day - 25))  # peaks in late January
    flu = city.flu_peak * np.exp(-0.5 * (days_from_flu_peak / 28.0) ** 2)

    temperature = city.temperature_mean + city.temperature_amplitude * season + rng.normal(0, 3.0, n_rows)
    humidity = np.clip(city.humidity - 0.4 * (temperature - city.temperature_mean) + rng.normal(0, 10, n_rows), 5, 100)
    pressure = 1013.0 + rng.normal(0, 8.0, n_rows)
    pm25 = city.pm25 * (1 + city.winter_pm_factor * winter) * rng.lognormal(0, 0.45, n_rows)
    pm10 = pm25 * rng.uniform(1.3, 2.2, n_rows)
    no2 = city.no2 * (1 + 0.35 * winter) * rng.lognormal(0, 0.35, n_rows)
    o3 = city.o3 * (1 + 0.7 * summer) * rng.lognormal(0, 0.3, n_rows)
    aqi = np.maximum.reduce([_aqi(pm25, _PM25_AQI), _aqi(pm10, _PM10_AQI), _aqi(o3 / _O3_UG_PER_PPB, _O3_PPB_AQI)])

    age = np.clip(rng.normal(city.age_mean, 17.0, n_rows), 18, 95)
    age_z = (age - 50.0) / 15.0
    older = np.maximum(age_z, 0.0)
    female = rng.random(n_rows) < 0.5
    smoker = rng.choice(np.array(["never", "former", "current"]), size=n_rows, p=city.smoking)
    current_smoker = smoker == "current"
    bmi = np.clip(rng.normal(city.bmi_mean + 0.8 * age_z, 4.5, n_rows), 15, 55)
    asthma = rng.random(n_rows) < _sigmoid(_logit(city.p_asthma_copd) + 0.8 * current_smoker
                                           + 0.4 * (smoker == "former"))
    diabetes = rng.random(n_rows) < _sigmoid(_logit(city.p_diabetes) + 0.12 * (bmi - 27) + 0.5 * age_z)
    cardio = rng.random(n_rows) < _sigmoid(_logit(city.p_cardiovascular) + 0.9 * age_z + 0.6 * diabetes
                                           + 0.6 * current_smoker)

    pollution = (pm25 - 12.0) / 15.0 + 0.5 * (no2 - 30.0) / 20.0
    ozone = (o3 - 60.0) / 40.0
    heat = np.maximum(temperature - 27.0, 0.0) / 4.0
    cold = np.maximum(3.0 - temperature, 0.0) / 6.0
    acute = (
        (0.2 + 1.3 * asthma + 0.5 * current_smoker + 0.3 * older) * (pollution + 0.7 * ozone)
        + ((0.2 + 1.2 * cardio + 0.4 * diabetes + 0.4 * older + 0.03 * (bmi - 27))
           * (heat + 0.5 * cold + 0.3 * pollution))
        + (0.6 + 0.8 * asthma + 0.6 * older + 0.3 * cardio) * 1.5 * flu
        + 0.2 * age_z
        + rng.normal(0, 1.0, n_rows)
    )

    frame = pd.DataFrame({
        "heart_rate": np.round(np.clip(66 + 3 * female + 4 * current_smoker + 0.2 * (bmi - 27) + 4.5 * acute
                                       + rng.normal(0, 7, n_rows), 30, 220)),
        "spo2": np.round(np.clip(97.3 - 1.0 * asthma - 0.02 * (age - 50) - 0.9 * acute + rng.normal(0, 0.9, n_rows),
                                 70, 100), 1),
        "body_temperature": np.round(np.clip(36.6 + 0.15 * acute + 0.6 * flu * rng.random(n_rows)
                                             + rng.normal(0, 0.3, n_rows), 34, 42), 2),
        "respiratory_rate": np.round(np.clip(15 + 0.8 * asthma + 1.4 * acute + rng.normal(0, 2.0, n_rows), 6, 40), 1),
        "steps": np.round(np.clip(np.exp(8.8 - 0.2 * acute - 0.25 * older + 0.15 * summer
                                         + rng.normal(0, 0.5, n_rows)), 0, 60000)),
        "sleep_hours": np.round(np.clip(7.2 - 0.35 * acute + rng.normal(0, 1.0, n_rows), 0, 16), 1),
        "pm25": np.round(np.clip(pm25, 0, 500), 1),
        "pm10": np.round(np.clip(pm10, 0, 800), 1),
        "no2": np.round(np.clip(no2, 0, 400), 1),
        "o3": np.round(np.clip(o3, 0, 400), 1),
        "aqi": np.round(np.clip(aqi, 0, 500)),
        "temperature": np.round(temperature, 1),
        "humidity": np.round(humidity),
        "pressure": np.round(pressure, 1),
        "age": np.round(age),
        "sex": np.where(female, "F", "M"),
        "bmi": np.round(bmi, 1),
        "asthma_copd": asthma.astype(int).astype(str),
        "diabetes": diabetes.astype(int).astype(str),
        "cardiovascular": cardio.astype(int).astype(str),
        "smoker": smoker,
    })
    # The risk is computed from the values as recorded (rounded, clipped), so it is exactly P(event | row).
    risk = true_risk(frame)
    frame["adverse_event_7d"] = (rng.random(n_rows) < risk).astype(int).astype(str)
    return frame.assign(_risk=risk)


@dataclass(frozen=True)
class HospitalSummary:
    hospital_id: str
    city: str
    rows: int
    event_rate: float
    mean_age: float
    mean_pm25: float
    mean_temperature: float
    asthma_copd_share: float
    bayes_auc: float


def hospital_ids(n_hospitals: int) -> list[str]:
    return [f"hospital-{i}" for i in range(1, n_hospitals + 1)]


# Patient-days per hospital in the independent cohort every model is also scored on: later days of the same city,
# never trained on, enough events for intervals of a few hundredths on a hospital's AUC and tighter on differences.
COHORT_ROWS = 20000
_COHORT_STREAM = 1  # the cohort's random stream beside the training data's: adding it changes no training row


def sizes_of(n_hospitals: int, rows_per_hospital: int | Sequence[int]) -> list[int]:
    """Each hospital's patient-days: the same for all, or one size per hospital (as many as there are)."""
    if isinstance(rows_per_hospital, int):
        return [rows_per_hospital] * n_hospitals
    sizes = list(rows_per_hospital)
    if len(sizes) != n_hospitals:
        raise ValueError(f"{len(sizes)} hospital sizes for {n_hospitals} hospitals")
    return sizes


def generate_cohort(*, n_hospitals: int, seed: int, rows: int = COHORT_ROWS) -> dict[str, pd.DataFrame]:
    """Each hospital's independent cohort: `rows` more patient-days of its city, drawn from a stream of `seed` the
    training data never uses, with each row's true risk in `_risk` (the Bayes-optimal prediction)."""
    rng = np.random.default_rng([seed, _COHORT_STREAM])
    return {hospital: generate_city_days(CITIES[index % len(CITIES)], rows, rng)
            for index, hospital in enumerate(hospital_ids(n_hospitals))}


def generate_dataset(out: Path, *, n_hospitals: int = 5, rows_per_hospital: int | Sequence[int] = 4000,
                     seed: int = 0, split_seed: int, test_fraction: float, stratify: bool = True
                     ) -> list[HospitalSummary]:
    """Write `out/hospital-k/patient_days.csv`, `out/spec.yaml` and `out/reference.json`.

    Hospital k is in city k (cycling through the five cities past five), with `rows_per_hospital` patient-days
    (one size for all, or one per hospital). `reference.json` scores the true risk on the same test split the
    models use.
    """
    sizes = sizes_of(n_hospitals, rows_per_hospital)
    spec: DatasetSpec = load_spec("health-risk")
    out.mkdir(parents=True, exist_ok=True)
    (out / SPEC_FILE_NAME).write_text(spec_to_yaml(spec), encoding="utf-8")
    rng = np.random.default_rng(seed)
    summaries: list[HospitalSummary] = []
    per_hospital: dict[str, dict[str, float]] = {}
    test_targets, test_risks = [], []
    for index, hospital_id in enumerate(hospital_ids(n_hospitals)):
        city = CITIES[index % len(CITIES)]
        frame = generate_city_days(city, sizes[index], rng)
        risk = frame.pop("_risk").to_numpy()
        folder = out / hospital_id
        folder.mkdir(exist_ok=True)
        write_csv(frame, folder / DATA_FILE_NAME)
        _, test = split_frame(frame, spec, hospital_id, seed=split_seed, test_fraction=test_fraction,
                              stratify=stratify)
        target = frame[spec.target.name].astype(int).to_numpy()
        test_targets.append(target[test])
        test_risks.append(risk[test])
        summaries.append(HospitalSummary(
            hospital_id=hospital_id, city=city.name, rows=len(frame), event_rate=float(target.mean()),
            mean_age=float(frame["age"].mean()), mean_pm25=float(frame["pm25"].mean()),
            mean_temperature=float(frame["temperature"].mean()),
            asthma_copd_share=float((frame["asthma_copd"] == "1").mean()),
            bayes_auc=float(weighted_auc(target[test], risk[test], np.ones((1, len(test))))[0])))
    # The true risk, flagged like a model trained on these rows: at the spec's threshold or the event rate.
    threshold = spec.threshold_for(sum(s.event_rate * s.rows for s in summaries) / sum(s.rows for s in summaries))
    for summary, target, risk in zip(summaries, test_targets, test_risks, strict=True):
        per_hospital[summary.hospital_id] = binary_metrics(target, risk, threshold, bootstrap=0)
    reference = {
        "kind": "bayes_optimal",
        "description": "the true event probability of each test row, scored like a model",
        "split": {"seed": split_seed, "test_fraction": test_fraction, "stratified": stratify},
        "generator": {"seed": seed, "hospitals": n_hospitals,
                      "rows_per_hospital": sizes[0] if len(set(sizes)) == 1 else sizes},
        "threshold": threshold,
        "overall": binary_metrics(np.concatenate(test_targets), np.concatenate(test_risks), threshold, bootstrap=0),
        "per_hospital": per_hospital,
        "cities": {s.hospital_id: s.city for s in summaries},
    }
    (out / REFERENCE_FILE_NAME).write_text(json.dumps(reference, indent=2), encoding="utf-8")
    return summaries


def generator_of(root: Path) -> tuple[int, list[int]] | None:
    """The generator seed and each hospital's patient-days of a generated data folder (None for other data): what
    its independent cohort is drawn from (`generate_cohort`)."""
    path = root / REFERENCE_FILE_NAME
    if not path.is_file():
        return None
    generator = json.loads(path.read_text(encoding="utf-8")).get("generator", {})
    return int(generator["seed"]), sizes_of(int(generator["hospitals"]), generator["rows_per_hospital"])


def read_reference(root: Path, *, split_seed: int, test_fraction: float, stratify: bool = True
                   ) -> dict[str, object] | None:
    """The Bayes-optimal scores of a generated data folder, if it has them and they match the split in use."""
    path = root / REFERENCE_FILE_NAME
    if not root.is_dir() or not path.is_file():
        return None
    reference = json.loads(path.read_text(encoding="utf-8"))
    if reference.get("split") != {"seed": split_seed, "test_fraction": test_fraction, "stratified": stratify}:
        return None  # scored on other test rows than the models will be: not comparable
    return {"overall": reference["overall"], "per_hospital": reference["per_hospital"],
            "mean_over_hospitals": mean_over_hospitals(reference["per_hospital"])}
