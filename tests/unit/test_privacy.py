"""Differential privacy's core: the noise planned for a whole run keeps each hospital within its budget, a budget
that cannot be met is refused with the reason, and DP-SGD training spends what was planned."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from health_mlops.fl.privacy import BudgetRefused, epsilon_spent, plan_privacy, train_model_private
from health_mlops.fl.privacy_budget import plan_for, privacy_refusal
from health_mlops.fl.run_config import MAX_NOISE_MULTIPLIER, PrivacyConfig, RunConfig, federated_run_config
from health_mlops.ml.train_config import TrainConfig
from health_mlops.spec import load_spec

ACCEPTANCE = {"rows": 3200, "batch_size": 64, "rounds": 20, "local_epochs": 1}  # a hospital of 4000, 80 % train


def test_the_planned_noise_spends_at_most_the_budget_over_the_whole_run() -> None:
    plans = {eps: plan_privacy(PrivacyConfig(epsilon=eps), **ACCEPTANCE) for eps in (1.0, 3.0, 8.0)}
    for eps, plan in plans.items():
        assert plan.steps == 20 * 50 and plan.sample_rate == 64 / 3200
        assert eps - 0.05 <= plan.epsilon <= eps + 0.01  # spent, by the accountant, over every step
        assert plan.epsilon == pytest.approx(epsilon_spent(plan.noise_multiplier, plan.sample_rate, plan.steps,
                                                           plan.delta))
    assert plans[1.0].noise_multiplier > plans[3.0].noise_multiplier > plans[8.0].noise_multiplier
    more_rounds = plan_privacy(PrivacyConfig(epsilon=3.0), **{**ACCEPTANCE, "rounds": 40})
    assert more_rounds.noise_multiplier > plans[3.0].noise_multiplier  # the same budget over more steps


@pytest.mark.parametrize(("config", "shape", "says"), [
    (PrivacyConfig(epsilon=0.01), ACCEPTANCE, "cannot be met"),
    (PrivacyConfig(epsilon=0.15), ACCEPTANCE, "needs noise multiplier 17.5"),
    (PrivacyConfig(epsilon=3.0), {**ACCEPTANCE, "rows": 50}, "lower --batch-size below 50"),
    (PrivacyConfig(epsilon=1.0, noise_multiplier=0.5), ACCEPTANCE, "spends"),
])
def test_a_budget_that_cannot_be_met_is_refused_with_the_reason(config: PrivacyConfig, shape: dict[str, int],
                                                                  says: str) -> None:
    with pytest.raises(BudgetRefused, match=says):
        plan_privacy(config, **shape)


def test_a_budget_is_validated_naming_its_field() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        PrivacyConfig(epsilon=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyConfig(epsilon=3, noise_multiplier=MAX_NOISE_MULTIPLIER * 2)


def rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    x = generator.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def test_dp_sgd_takes_the_planned_steps_and_leaves_a_plain_model() -> None:
    x, y = rows(512, seed=1)
    plan = plan_privacy(PrivacyConfig(epsilon=3.0), rows=512, batch_size=32, rounds=3, local_epochs=1)
    trained = model(0)
    names = list(trained.state_dict())
    config = TrainConfig(epochs=1, learning_rate=0.01, batch_size=32)
    spent_steps = 0
    for _ in range(3):  # three rounds, as the plan says
        result, steps = train_model_private(trained, x, y, "binary", config, plan, epochs=1)
        spent_steps += steps
        assert result.examples == 512 and np.isfinite(result.mean_loss)
    assert spent_steps == plan.steps  # what the budget was planned for
    assert list(trained.state_dict()) == names  # no Opacus wrapper left: the weights go to the aggregator as is
    assert all(not layer._forward_hooks and not layer._backward_hooks for layer in trained)
    # Opacus's own accountant over the steps taken agrees with the plan.
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, spent_steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert accountant.get_epsilon(plan.delta) == pytest.approx(plan.epsilon)


def test_dp_sgd_adds_noise_and_clips_each_record() -> None:
    x, y = rows(256, seed=2)
    config = TrainConfig(epochs=1, learning_rate=0.01, batch_size=32)
    base = plan_privacy(PrivacyConfig(epsilon=3.0), rows=256, batch_size=32, rounds=1, local_epochs=1)
    weights = []
    for noise_seed in (0, 1):  # the same data and start; the noise (and Poisson sampling) draws differ
        trained = model(0)
        torch.manual_seed(noise_seed)
        train_model_private(trained, x, y, "binary", config, base, epochs=1)
        weights.append(torch.cat([p.detach().reshape(-1) for p in trained.parameters()]))
    assert not torch.allclose(weights[0], weights[1])
    with pytest.raises(BudgetRefused, match="proximal"):
        train_model_private(model(0), x, y, "binary", TrainConfig(epochs=1, learning_rate=0.01, batch_size=32,
                                                                   proximal_mu=0.1), base, epochs=1)


def test_a_refusal_at_several_small_sites_names_each_and_a_batch_that_meets_the_budget_at_all() -> None:
    """The default DP batch on small real sites: refused one site at a time, naming the setting, not the flag;
    and ε = 1's refusal did not say that a smaller batch would meet it."""
    config = RunConfig(rounds=20, batch_size=512, privacy=PrivacyConfig(epsilon=1.0))
    sites = {"hospital-1": 242, "hospital-2": 3000, "hospital-3": 37}
    refusal = privacy_refusal(config, sites)
    assert refusal is not None and refusal.startswith("privacy budget refused at 2 of 3 hospitals")
    assert "at hospital-1: 242 training rows" in refusal and "at hospital-3: 37 training rows" in refusal
    assert "hospital-2" not in refusal
    suggested = int(re.search(r"--batch-size (\d+) meets the budget at every hospital", refusal).group(1))
    assert privacy_refusal(config.model_copy(update={"batch_size": suggested}), sites) is None
    assert plan_privacy(PrivacyConfig(epsilon=1.0), rows=242, batch_size=suggested, rounds=20,
                        local_epochs=1).noise_multiplier <= MAX_NOISE_MULTIPLIER


def test_by_default_each_hospital_samples_a_share_of_its_rows_so_small_sites_spend_as_large_ones_do() -> None:
    """A fixed DP batch of 512 was refused at every small real site ("242 training rows cannot sample batches of
    512"); a sampling rate gives each site its own batch, the same sampling and so the same noise."""
    config = federated_run_config(load_spec("health-risk"), 3, privacy=PrivacyConfig(epsilon=1.0))
    sites = {"hospital-1": 242, "hospital-2": 3200, "hospital-3": 37}
    assert privacy_refusal(config, sites) is None
    rate = config.privacy.sampling_rate
    assert {h: config.batch_size_at(rows) for h, rows in sites.items()} == {
        h: round(rate * rows) for h, rows in sites.items()}
    plans = [plan_for(config, rows) for rows in sites.values()]
    assert max(p.noise_multiplier for p in plans) - min(p.noise_multiplier for p in plans) < 0.1
    assert all(p.epsilon <= 1.0 + 0.01 for p in plans)
    given = federated_run_config(load_spec("health-risk"), 3, privacy=PrivacyConfig(epsilon=1.0), batch_size=32)
    assert given.privacy.sampling_rate is None and given.batch_size_at(3200) == 32  # a batch given is kept
