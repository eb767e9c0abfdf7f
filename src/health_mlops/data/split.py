"""Each hospital's deterministic train/test split; the test rows never leave the hospital, only metrics do."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from health_mlops.spec import DatasetSpec

if TYPE_CHECKING:
    from health_mlops.data.hospital import HospitalData

REGRESSION_STRATA = 5  # a regression target is stratified by its quintiles


def split_indices(n_rows: int, hospital_id: str, *, seed: int, test_fraction: float,
                  strata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices; the same (rows, hospital, seed, strata) always gives the same split.

    The hospital id enters the seed so that hospitals with the same row count do not share a split. With
    `strata` (a label per row), each stratum is split in the same proportion, so the test rows hold events in the
    share the hospital's rows do; a stratum of two rows or more puts at least one in each side, so a small
    hospital's test rows still hold both outcomes when it has two of each.
    """
    if n_rows < 2:
        return np.arange(n_rows), np.arange(0)
    rng = np.random.default_rng([seed, zlib.crc32(hospital_id.encode("utf-8"))])
    if strata is None:
        n_test = min(max(1, round(n_rows * test_fraction)), n_rows - 1)
        order = rng.permutation(n_rows)
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    test: list[np.ndarray] = []
    for stratum in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == stratum))
        n_test = min(max(1, round(len(rows) * test_fraction)), len(rows) - 1) if len(rows) >= 2 else 0
        test.append(rows[:n_test])
    chosen = np.zeros(n_rows, dtype=bool)
    chosen[np.concatenate(test)] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def target_strata(frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    """What a split is stratified by: the outcome (binary tasks) or the target's quintile (regression)."""
    target = frame[spec.target.name].astype(np.float64).to_numpy()
    if spec.task == "binary" or len(target) == 0:
        return target
    edges = np.quantile(target, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1])
    return np.searchsorted(edges, target, side="right").astype(np.float64)


def split_frame(frame: pd.DataFrame, spec: DatasetSpec, hospital_id: str, *, seed: int, test_fraction: float,
                stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """A hospital's (train, test) rows, stratified by the target unless `stratify` is off."""
    strata = target_strata(frame, spec) if stratify else None
    return split_indices(len(frame), hospital_id, seed=seed, test_fraction=test_fraction, strata=strata)


@dataclass(frozen=True)
class HospitalSplit:
    hospital_id: str
    train: pd.DataFrame
    test: pd.DataFrame


def split_hospitals(hospitals: dict[str, HospitalData], spec: DatasetSpec, *, seed: int, test_fraction: float,
                    stratify: bool = True) -> list[HospitalSplit]:
    """Each hospital's own split, as its node makes it (`split_frame`)."""
    splits = []
    for hospital_id, data in hospitals.items():
        train, test = split_frame(data.frame, spec, hospital_id, seed=seed, test_fraction=test_fraction,
                                  stratify=stratify)
        splits.append(HospitalSplit(hospital_id, data.frame.iloc[train].reset_index(drop=True),
                                    data.frame.iloc[test].reset_index(drop=True)))
    return splits


# Fewer validation rows than this measure nothing: a site that small trains on all its rows, without early stopping.
MIN_VALIDATION_ROWS = 10


def holds_validation(rows: int, fraction: float) -> bool:
    """Whether `rows` training rows hold out a validation part: `fraction` of them, at least `MIN_VALIDATION_ROWS`."""
    return round(rows * fraction) >= MIN_VALIDATION_ROWS


def hold_out_validation(frame: pd.DataFrame, spec: DatasetSpec, hospital_id: str, *, fraction: float
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A hospital's training rows as (fit, validation): `fraction` of them, stratified by the target, held out to
    stop training early and to choose the federation's best round. The same rows always give the same parts.
    Where the validation part would hold fewer than `MIN_VALIDATION_ROWS` rows, every row fits and none validates."""
    if not holds_validation(len(frame), fraction):
        return frame, frame.iloc[:0]
    fit, validation = split_indices(len(frame), f"{hospital_id}/validation", seed=0, test_fraction=fraction,
                                    strata=target_strata(frame, spec))
    return frame.iloc[fit].reset_index(drop=True), frame.iloc[validation].reset_index(drop=True)
