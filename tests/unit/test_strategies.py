"""Strategies against hand-computed values, and on random inputs against Flower's own implementations."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
from flwr.server.strategy import aggregate as flwr_aggregate
from pydantic import ValidationError

from health_mlops.fl.run_config import ServerOptimiserConfig, StrategyConfig
from health_mlops.fl.strategy_table import STRATEGIES, StrategyName, strategy_names
from health_mlops.fl.strategies import (ClientUpdate, RoundAggregation, ServerOptimiserState, aggregate,
                                        aggregate_fedavg, aggregate_median, aggregate_trimmed_mean,
                                        server_optimiser_step)


def update(values: list[float], examples: int) -> ClientUpdate:
    return ClientUpdate({"w": np.array(values), "b": np.array([values[0]])}, examples)


def test_fedavg_weighs_hospitals_by_examples() -> None:
    result = aggregate_fedavg([update([1.0, 2.0], 100), update([4.0, 8.0], 300)])
    np.testing.assert_allclose(result["w"], [(1 * 100 + 4 * 300) / 400, (2 * 100 + 8 * 300) / 400])
    np.testing.assert_allclose(result["b"], [3.25])


def test_median_and_trimmed_mean_ignore_example_counts_and_outliers() -> None:
    updates = [update([1.0, 0.0], 10), update([2.0, 0.0], 10), update([3.0, 0.0], 10), update([4.0, 0.0], 10),
               update([1000.0, -1000.0], 10_000)]
    np.testing.assert_allclose(aggregate_median(updates)["w"], [3.0, 0.0])
    # 5 updates, trim 20 %: one from each end -> mean of the middle three.
    np.testing.assert_allclose(aggregate_trimmed_mean(updates, 0.2)["w"], [3.0, 0.0])
    np.testing.assert_allclose(aggregate_trimmed_mean(updates, 0.0)["w"], [202.0, -200.0])


def test_fedadam_first_step_by_hand() -> None:
    current = {"w": np.array([0.0, 1.0])}
    averaged = {"w": np.array([0.5, 0.0])}  # delta = [0.5, -1]
    config = ServerOptimiserConfig(learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=1e-12)  # ~0: exact by hand
    new, state = server_optimiser_step(current, averaged, ServerOptimiserState(), config, variant="adam")
    # m = 0.1 * delta, v = 0.01 * delta², eta = 0.1 * sqrt(0.01) / 0.1 = 0.1; step = eta * m / sqrt(v) = 0.1 * sign
    np.testing.assert_allclose(new["w"], [0.1, 0.9])
    np.testing.assert_allclose(state.first_moment["w"], [0.05, -0.1])
    assert state.steps == 1


def test_strategy_dispatch_leaves_optimiser_state_alone_for_plain_averaging() -> None:
    updates = [update([1.0, 1.0], 1), update([3.0, 3.0], 1)]
    current = {"w": np.zeros(2), "b": np.zeros(1)}
    for name in ("fedavg", "fedprox"):
        weights, state = aggregate(StrategyConfig(name=name), current, updates, ServerOptimiserState())
        np.testing.assert_allclose(weights["w"], [2.0, 2.0])
        assert state.steps == 0
    _, state = aggregate(StrategyConfig(name="fedyogi"), current, updates, ServerOptimiserState())
    assert state.steps == 1


def test_mismatched_or_empty_updates_are_refused() -> None:
    with pytest.raises(ValueError, match="no updates"):
        aggregate_fedavg([])
    with pytest.raises(ValueError, match="different tensors"):
        aggregate_fedavg([update([1.0], 1), ClientUpdate({"other": np.zeros(1)}, 1)])


# --- the same results as Flower's reference implementations (flwr is a test extra only), random inputs ---

def random_updates(rng: np.random.Generator, n: int) -> list[ClientUpdate]:
    """float32, as hospitals send them."""
    return [ClientUpdate({"layer.weight": rng.normal(size=(4, 3)).astype(np.float32),
                          "layer.bias": rng.normal(size=3).astype(np.float32)}, int(rng.integers(1, 1000)))
            for _ in range(n)]


def as_flower(updates: list[ClientUpdate]) -> list[tuple[list[np.ndarray], int]]:
    return [(list(u.weights.values()), u.num_examples) for u in updates]


@pytest.mark.parametrize("seed", range(5))
def test_plain_aggregations_match_flower(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = random_updates(rng, int(rng.integers(2, 9)))
    ours = [aggregate_fedavg(updates), aggregate_median(updates), aggregate_trimmed_mean(updates, 0.25)]
    theirs = [flwr_aggregate.aggregate(as_flower(updates)), flwr_aggregate.aggregate_median(as_flower(updates)),
              flwr_aggregate.aggregate_trimmed_avg(as_flower(updates), 0.25)]
    for our, their in zip(ours, theirs, strict=True):
        for mine, reference in zip(our.values(), their, strict=True):
            assert mine.dtype == np.float32  # the model's precision
            np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "variant"), [("FedAdam", "adam"), ("FedYogi", "yogi")])
def test_server_optimisers_match_flower_over_several_rounds(name: str, variant: str) -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import strategy as flwr_strategy

    rng = np.random.default_rng(11)
    current = {"layer.weight": rng.normal(size=(4, 3)).astype(np.float32),
               "layer.bias": rng.normal(size=3).astype(np.float32)}
    config = ServerOptimiserConfig(learning_rate=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3)
    flower = getattr(flwr_strategy, name)(initial_parameters=ndarrays_to_parameters(list(current.values())),
                                          eta=config.learning_rate, beta_1=config.beta_1, beta_2=config.beta_2,
                                          tau=config.tau)
    state = ServerOptimiserState()
    for step in range(1, 5):
        updates = random_updates(rng, 4)
        current, state = server_optimiser_step(current, aggregate_fedavg(updates), state, config, variant=variant)
        results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(u.weights.values())),
                                 u.num_examples, {})) for u in updates]
        # Flower's FedAdam corrects Adam's bias with exponent (server_round + 1): our step k is its round k - 1.
        parameters, _ = flower.aggregate_fit(step - 1 if variant == "adam" else step, results, [])
        for mine, reference in zip(current.values(), parameters_to_ndarrays(parameters), strict=True):
            np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-7)


# --- streaming and chunked aggregation: the same numbers, whatever the order of arrival or the chunk size ---

def float32_updates(rng: np.random.Generator, n: int, size: int) -> list[ClientUpdate]:
    return [ClientUpdate({"w": rng.normal(size=(size, 3)).astype(np.float32), "b": rng.normal(size=size)
                          .astype(np.float32)}, int(rng.integers(1, 5000))) for _ in range(n)]


def test_the_weighted_mean_of_many_updates_keeps_float32_precision() -> None:
    """The cascade of float32 partial sums (WeightedMean): each holds at most 16 terms, so the error stays at a
    few float32 roundings of the summed magnitudes however many hospitals answer; one float32 running sum's
    grows with their number."""
    rng = np.random.default_rng(3)
    updates = float32_updates(rng, 300, 20_000)  # three levels of partial sums; longer than one fold chunk
    for update in updates:  # values that nearly cancel: the hard case for a float32 sum
        update.weights["w"][:] = np.float32(1000.0) * np.sign(rng.normal(size=update.weights["w"].shape))
    folded = aggregate_fedavg(updates)
    examples = np.array([u.num_examples for u in updates], dtype=np.float64)
    for name in ("w", "b"):
        values = np.stack([u.weights[name].astype(np.float64) for u in updates])
        exact = np.tensordot(examples / examples.sum(), values, axes=1)
        magnitude = np.tensordot(examples / examples.sum(), np.abs(values), axes=1)
        error = np.abs(folded[name] - exact) / magnitude
        assert folded[name].dtype == np.float32 and folded[name].shape == updates[0].weights[name].shape
        assert error.max() < 40 * 2.0**-24, error.max()
        running = np.zeros_like(updates[0].weights[name])
        for update in updates:
            running += update.weights[name] * np.float32(update.num_examples)
        running /= np.float32(examples.sum())
        assert error.max() < np.max(np.abs(running - exact) / magnitude) / 4


@pytest.mark.parametrize("name", ["fedavg", "fedyogi", "median", "trimmed_mean"])
def test_a_round_fed_result_by_result_in_any_order_aggregates_like_the_whole_round(name: str) -> None:
    rng = np.random.default_rng(8)
    updates = float32_updates(rng, 7, 100)
    current = {"w": np.zeros((100, 3)), "b": np.zeros(100)}
    whole, _ = aggregate(StrategyConfig(name=name), current, updates, ServerOptimiserState())
    streamed = RoundAggregation(StrategyConfig(name=name), current)
    for index in rng.permutation(len(updates)):
        streamed.add(updates[index])
    assert streamed.updates == len(updates)
    weights, _ = streamed.finish(ServerOptimiserState())
    for tensor in ("w", "b"):  # float32 sums in another order: the same to float32 rounding
        np.testing.assert_allclose(weights[tensor], whole[tensor], rtol=1e-6, atol=1e-6)


def test_robust_strategies_give_the_same_answer_in_chunks_of_any_size() -> None:
    updates = float32_updates(np.random.default_rng(4), 9, 1000)
    for chunk_bytes in (1, 8 * 9 * 7, 10**9):  # one element at a time, 7 at a time, all at once
        np.testing.assert_array_equal(aggregate_median(updates, chunk_bytes=chunk_bytes)["w"],
                                      aggregate_median(updates)["w"])
        np.testing.assert_array_equal(aggregate_trimmed_mean(updates, 0.25, chunk_bytes=chunk_bytes)["w"],
                                      aggregate_trimmed_mean(updates, 0.25)["w"])
    flower = flwr_aggregate.aggregate_median(as_flower(updates))
    np.testing.assert_allclose(aggregate_median(updates, chunk_bytes=100)["w"], flower[0], rtol=1e-7)


def test_an_update_with_other_tensors_or_no_examples_is_refused_by_the_round() -> None:
    current = {"w": np.zeros(3)}
    for name in ("fedavg", "median"):
        streamed = RoundAggregation(StrategyConfig(name=name), current)
        streamed.add(ClientUpdate({"w": np.ones(3)}, 5))
        with pytest.raises(ValueError, match="different tensors"):
            streamed.add(ClientUpdate({"other": np.ones(3)}, 5))
    with pytest.raises(ValueError, match="examples"):
        RoundAggregation(StrategyConfig(name="fedavg"), current).add(ClientUpdate({"w": np.ones(3)}, 0))


def test_the_strategy_table_names_every_strategy_and_only_options_a_strategy_config_has() -> None:
    assert list(STRATEGIES) == list(get_args(StrategyName))
    assert {option for kind in STRATEGIES.values() for option in kind.options} <= set(StrategyConfig.model_fields)
    assert strategy_names(where=lambda kind: kind.robust) == ["median", "trimmed_mean"]
    assert strategy_names(where=lambda kind: kind.server_state) == ["fedadam", "fedyogi"]


@pytest.mark.parametrize(("name", "option", "value"), [("fedavg", "proximal_mu", 0.5), ("median", "trim_fraction", 0.1),
                                                       ("fedprox", "server", {"learning_rate": 0.5})])
def test_an_option_the_strategy_does_not_read_is_refused_naming_the_option(name: str, option: str,
                                                                           value: object) -> None:
    with pytest.raises(ValidationError, match=rf"{option}\n.*only .* reads? {option}; the strategy is {name}"):
        StrategyConfig.model_validate({"name": name, option: value})
    default = StrategyConfig.model_fields[option].default
    assert getattr(StrategyConfig.model_validate({"name": name, option: default}), option) == default  # as dumped
