"""Aggregation strategies: pure functions over hospitals' updates, no I/O, no hidden state.

A hospital's update is its locally trained weights and the number of examples it trained on. Weighted
strategies (FedAvg, and the server optimisers built on it) weigh hospitals by examples; the robust ones
(coordinate-wise median, trimmed mean) weigh every hospital the same, so that one hospital cannot drag the
model however many rows it claims. FedProx is FedAvg on the server plus a proximal term in each hospital's
local training (`TrainConfig.proximal_mu`).

FedAdam and FedYogi (Reddi et al., "Adaptive Federated Optimization", 2021) treat the difference between
the FedAvg aggregate and the current global model as a pseudo-gradient and take one server optimiser step;
their moment estimates are returned as explicit state, so the coordinator can checkpoint them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Weights = dict[str, np.ndarray]
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean"]
STRATEGY_NAMES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean")


@dataclass(frozen=True)
class ClientUpdate:
    weights: Mapping[str, np.ndarray]
    num_examples: int


def _names(updates: Sequence[ClientUpdate]) -> list[str]:
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    names = list(updates[0].weights)
    for update in updates[1:]:
        if set(update.weights) != set(names):  # order may differ (safetensors stores tensors by name)
            raise ValueError("updates hold different tensors")
    return names


def _stacked(updates: Sequence[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([np.asarray(u.weights[name], dtype=np.float64) for u in updates])


def aggregate_fedavg(updates: Sequence[ClientUpdate]) -> Weights:
    """Average of the hospitals' weights, each weighted by its number of training examples."""
    names = _names(updates)
    examples = np.array([u.num_examples for u in updates], dtype=np.float64)
    if examples.sum() <= 0:
        raise ValueError("updates report no training examples")
    share = examples / examples.sum()
    return {n: np.tensordot(share, _stacked(updates, n), axes=1) for n in names}


def aggregate_median(updates: Sequence[ClientUpdate]) -> Weights:
    """Coordinate-wise median of the hospitals' weights (robust to a minority of bad updates)."""
    return {n: np.median(_stacked(updates, n), axis=0) for n in _names(updates)}


def aggregate_trimmed_mean(updates: Sequence[ClientUpdate], trim_fraction: float) -> Weights:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values of each weight."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    names = _names(updates)
    cut = int(trim_fraction * len(updates))
    result = {}
    for n in names:
        ordered = np.sort(_stacked(updates, n), axis=0)
        result[n] = ordered[cut:len(updates) - cut].mean(axis=0)
    return result


@dataclass(frozen=True)
class ServerOptimiserState:
    """First and second moments of the server optimiser, and how many steps it has taken."""

    first_moment: Weights = field(default_factory=dict)
    second_moment: Weights = field(default_factory=dict)
    steps: int = 0


class ServerOptimiserConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(0.01, gt=0, le=10, description="server step size (eta)")
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-9, gt=0, le=1, description="adaptivity: keeps the step finite where the second moment is 0")


def server_optimiser_step(current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
                          state: ServerOptimiserState, config: ServerOptimiserConfig, *,
                          variant: Literal["adam", "yogi"]) -> tuple[Weights, ServerOptimiserState]:
    """One FedAdam or FedYogi step from `current` toward the FedAvg aggregate `averaged`."""
    b1, b2 = config.beta_1, config.beta_2
    step = state.steps + 1
    new_weights: Weights = {}
    first: Weights = {}
    second: Weights = {}
    for name, base in current.items():
        base = np.asarray(base, dtype=np.float64)
        delta = np.asarray(averaged[name], dtype=np.float64) - base
        m = state.first_moment.get(name, np.zeros_like(base))
        v = state.second_moment.get(name, np.zeros_like(base))
        m = b1 * m + (1 - b1) * delta
        if variant == "adam":
            v = b2 * v + (1 - b2) * delta**2
            # Adam's bias correction folded into the step size, so the first rounds are not too timid.
            eta = config.learning_rate * np.sqrt(1 - b2**step) / (1 - b1**step)
        else:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
            eta = config.learning_rate
        new_weights[name] = base + eta * m / (np.sqrt(v) + config.tau)
        first[name], second[name] = m, v
    return new_weights, replace(state, first_moment=first, second_moment=second, steps=step)


class StrategyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: StrategyName = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="share cut from each end (trimmed_mean)")
    proximal_mu: float = Field(0.01, ge=0, le=100, description="hospitals' proximal term (fedprox only)")
    server: ServerOptimiserConfig = ServerOptimiserConfig()


def aggregate(config: StrategyConfig, current: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate],
              state: ServerOptimiserState) -> tuple[Weights, ServerOptimiserState]:
    """The new global weights under `config`'s strategy (and the server optimiser's new state)."""
    if config.name in ("fedavg", "fedprox"):
        return aggregate_fedavg(updates), state
    if config.name == "median":
        return aggregate_median(updates), state
    if config.name == "trimmed_mean":
        return aggregate_trimmed_mean(updates, config.trim_fraction), state
    variant: Literal["adam", "yogi"] = "adam" if config.name == "fedadam" else "yogi"
    return server_optimiser_step(current, aggregate_fedavg(updates), state, config.server, variant=variant)
