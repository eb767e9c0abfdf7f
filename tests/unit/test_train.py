from dataclasses import replace

import numpy as np
import pytest
import torch

from health_mlops.ml.model import build_model, get_weights
from health_mlops.ml.train import mean_loss, predict, train_model
from health_mlops.ml.train_config import WEIGHT_DECAY_FULL_ROWS, TrainConfig
from health_mlops.spec import ModelDefaults


def linear_problem(n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    logit = x @ np.array([2.0, -1.0, 0.5, 0.0])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return x, y


def test_training_lowers_the_loss_and_learns_the_signal() -> None:
    x, y = linear_problem()
    model = build_model(ModelDefaults(kind="linear"), 4)
    config = TrainConfig(epochs=1, learning_rate=0.05, batch_size=64)
    first = train_model(model, x, y, "binary", config)
    later = train_model(model, x, y, "binary", TrainConfig(epochs=10, learning_rate=0.05, batch_size=64))
    assert later.mean_loss < first.mean_loss
    weights = model[0].weight.detach().numpy().ravel()
    assert weights[0] > 1.0 and weights[1] < -0.5
    p = predict(model, x, "binary")
    assert ((p >= 0) & (p <= 1)).all()


def test_same_seed_same_model() -> None:
    x, y = linear_problem(500)
    results = []
    for _ in range(2):
        model = build_model(ModelDefaults(kind="mlp", hidden=(8,)), 4, seed=3)
        train_model(model, x, y, "binary", TrainConfig(epochs=2, learning_rate=0.01, batch_size=32, seed=5))
        results.append(get_weights(model))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name])


def test_fedprox_term_keeps_weights_near_the_global_model() -> None:
    x, y = linear_problem()
    distances = {}
    for mu in (0.0, 10.0):
        model = build_model(ModelDefaults(kind="linear"), 4)
        start = get_weights(model)
        train_model(model, x, y, "binary", TrainConfig(epochs=3, learning_rate=0.05, batch_size=64, proximal_mu=mu))
        end = get_weights(model)
        distances[mu] = sum(float(((end[k] - start[k]) ** 2).sum()) for k in start)
    assert distances[10.0] < 0.5 * distances[0.0]


def test_local_steps_take_exactly_that_many_optimiser_steps_across_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = linear_problem(100)  # 4 batches of 32 an epoch (the last one of 4 rows)
    taken = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (taken.append(1), original(self, *a, **k))[1])
    found = []
    for max_steps in (3, 4, 10):
        taken.clear()
        shares: list[float] = []
        train_model(build_model(ModelDefaults(kind="linear"), 4), x, y, "binary",
                    TrainConfig(epochs=1, learning_rate=0.05, batch_size=32, max_steps=max_steps),
                    on_progress=shares.append)
        found.append((len(taken), shares))
    # 10 steps: two whole epochs and 2 steps of a third; progress after each epoch, as a share of the budget
    assert found == [(3, [1.0]), (4, [1.0]), (10, [0.4, 0.8, 1.0])]


def test_early_stopping_ends_an_overfitting_run_with_the_weights_that_validated_best() -> None:
    """Pure-noise labels: a wide network memorises its 60 training rows, and its loss on held-out rows rises."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), (rng.random(60) < 0.5).astype(np.float32)
    vx, vy = rng.normal(size=(200, 4)).astype(np.float32), (rng.random(200) < 0.5).astype(np.float32)
    config = TrainConfig(epochs=1, learning_rate=0.01, batch_size=16, max_steps=5000, patience=5)
    model = build_model(ModelDefaults(kind="mlp", hidden=(64, 64)), 4, seed=0)
    result = train_model(model, x, y, "binary", config, validation=(vx, vy))
    assert result.stopped_early and result.steps < 5000
    assert result.validation_loss == pytest.approx(mean_loss(model, vx, vy, "binary"))  # the best weights, kept
    overfit = build_model(ModelDefaults(kind="mlp", hidden=(64, 64)), 4, seed=0)
    full = train_model(overfit, x, y, "binary", TrainConfig(epochs=1, learning_rate=0.01, batch_size=16,
                                                            max_steps=5000))
    assert full.steps == 5000 and not full.stopped_early and full.validation_loss is None
    assert mean_loss(overfit, vx, vy, "binary") > result.validation_loss + 0.1


def test_a_step_budget_trains_a_small_site_as_long_as_a_large_one() -> None:
    config = TrainConfig(epochs=1, learning_rate=0.01, batch_size=64, max_steps=300)
    for rows in (40, 4000):
        x, y = linear_problem(rows)
        assert train_model(build_model(ModelDefaults(kind="linear"), 4), x, y, "binary", config).steps == 300


def rare_event_problem(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A 6 % event rate, risk rising with the first column (log odds 1.5 a standard deviation), the second noise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (rng.random(n) < 1 / (1 + np.exp(3.5 - 1.5 * x[:, 0]))).astype(np.float32)
    return x, y


def fitted_slope(x: np.ndarray, y: np.ndarray, weight_decay: float) -> float:
    model = build_model(ModelDefaults(kind="linear"), 2)
    train_model(model, x, y, "binary", TrainConfig(epochs=1, learning_rate=0.01, batch_size=64,
                                                   weight_decay=weight_decay, max_steps=2000))
    return float(model[0].weight.detach()[0, 0])


def test_weight_decay_restrains_a_small_site_and_leaves_large_data_its_signal() -> None:
    """Whole on 20,000 rows, a penalty of 0.01 shrank the effect 43 % (1.50 to 0.85), and a pooled model scored a
    patient with asthma under heavy PM2.5 at half the risk the data showed; as a prior it shrinks with the rows."""
    large = rare_event_problem(20 * WEIGHT_DECAY_FULL_ROWS)
    assert fitted_slope(*large, weight_decay=0.01) == pytest.approx(fitted_slope(*large, weight_decay=0.0), rel=0.1)
    small = rare_event_problem(150)
    assert fitted_slope(*small, weight_decay=0.01) < 0.8 * fitted_slope(*small, weight_decay=0.0)


def test_a_federations_hospital_takes_the_weight_decay_of_all_the_rows_it_learns_from() -> None:
    config = TrainConfig(epochs=1, learning_rate=0.01, batch_size=64, weight_decay=0.01)
    assert config.weight_decay_for(WEIGHT_DECAY_FULL_ROWS) == 0.01
    assert config.weight_decay_for(4 * WEIGHT_DECAY_FULL_ROWS) == pytest.approx(0.0025)
    federated = replace(config, prior_rows=4 * WEIGHT_DECAY_FULL_ROWS)
    assert federated.weight_decay_for(WEIGHT_DECAY_FULL_ROWS // 5) == pytest.approx(0.0025)
