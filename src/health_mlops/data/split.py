"""Each hospital's deterministic train/test split; the test rows never leave the hospital, only metrics do."""

from __future__ import annotations

import zlib

import numpy as np


def split_indices(n_rows: int, hospital_id: str, *, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices; the same (rows, hospital, seed) always gives the same split.

    The hospital id enters the seed so that hospitals with the same row count do not share a split.
    """
    if n_rows < 2:
        return np.arange(n_rows), np.arange(0)
    rng = np.random.default_rng([seed, zlib.crc32(hospital_id.encode("utf-8"))])
    n_test = min(max(1, round(n_rows * test_fraction)), n_rows - 1)
    order = rng.permutation(n_rows)
    return np.sort(order[n_test:]), np.sort(order[:n_test])
