"""The poisoning benchmark's attacks (benchmarks/poisoning.py): what each sends, and that the coordinator accepts it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from health_mlops.fl.admission import validate_update

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # benchmarks/ is not a package
from poisoning import ATTACKS, BOUND_SHARE, SIGN_FLIP_BOOST, Attack, delta_norm, poisoned_update  # noqa: E402

BOUND = 100.0
GLOBAL = {"w": np.array([[0.5, -1.0], [2.0, 0.0]]), "b": np.array([0.25])}  # float64, as after aggregation


def honest(step: float) -> dict[str, np.ndarray]:
    """Locally trained float32 weights: the global model plus `step` along a fixed direction."""
    direction = {"w": np.array([[1.0, 2.0], [-2.0, 0.5]]), "b": np.array([1.0])}
    return {n: (GLOBAL[n] + step * direction[n]).astype(np.float32) for n in GLOBAL}


def delta(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: weights[n].astype(np.float64) - GLOBAL[n] for n in GLOBAL}


def test_sign_flip_sends_the_honest_delta_negated_and_amplified() -> None:
    local = honest(0.01)  # small: the amplified flip stays well inside the bound
    sent = poisoned_update("sign_flip", GLOBAL, local, norm_bound=BOUND, rng=np.random.default_rng(0))
    for name in GLOBAL:
        np.testing.assert_allclose(delta(sent)[name], -SIGN_FLIP_BOOST * delta(local)[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("step", [1e-3, 1.0, 1e4])
def test_every_attack_stays_inside_the_bound_and_the_coordinator_accepts_it(attack: Attack, step: float) -> None:
    local = honest(step)
    sent = poisoned_update(attack, GLOBAL, local, norm_bound=BOUND, rng=np.random.default_rng(0))
    validate_update(GLOBAL, sent, BOUND)  # raises Rejected otherwise
    assert delta_norm(delta(sent)) <= BOUND_SHARE * BOUND * (1 + 1e-6)
    assert {n: t.dtype for n, t in sent.items()} == {n: t.dtype for n, t in local.items()}


def test_a_long_honest_delta_is_clipped_to_the_bound_in_its_direction() -> None:
    local = honest(1e4)  # honest norm ~3e4: scaled and sign_flip are clipped to 99 % of the bound
    honest_delta = delta(local)
    for attack, sign in (("scaled", 1.0), ("sign_flip", -1.0)):
        sent = delta(poisoned_update(attack, GLOBAL, local, norm_bound=BOUND, rng=np.random.default_rng(0)))
        assert delta_norm(sent) == pytest.approx(BOUND_SHARE * BOUND, rel=1e-5)
        cosine = sum(float(np.sum(sent[n] * honest_delta[n])) for n in GLOBAL) / (
            delta_norm(sent) * delta_norm(honest_delta))
        assert cosine == pytest.approx(sign, abs=1e-6)


def test_random_has_the_bound_norm_whatever_the_honest_update_and_is_seeded() -> None:
    first = poisoned_update("random", GLOBAL, honest(1e-3), norm_bound=BOUND, rng=np.random.default_rng(3))
    again = poisoned_update("random", GLOBAL, honest(5.0), norm_bound=BOUND, rng=np.random.default_rng(3))
    other = poisoned_update("random", GLOBAL, honest(1e-3), norm_bound=BOUND, rng=np.random.default_rng(4))
    assert delta_norm(delta(first)) == pytest.approx(BOUND_SHARE * BOUND, rel=1e-5)
    for name in GLOBAL:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.allclose(first["w"], other["w"])
