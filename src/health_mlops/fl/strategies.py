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

from collections.abc import Callable, Mapping, Sequence
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


# Elements folded or reduced at a time: a chunk's temporaries stay in the CPU cache, so memory traffic is one
# read of each update and one read-write of the accumulator, and no temporary grows with the model.
FOLD_CHUNK_ELEMENTS = 1 << 15
# What a robust strategy holds of all hospitals' values at once (their chunks stacked): bounded whatever the
# number of hospitals and the model size.
ROBUST_CHUNK_BYTES = 32 * 1024 * 1024


class WeightedMean:
    """FedAvg's running sum: each update is folded in when it arrives (`add`), so closing a round is one pass
    over the model (`mean`), however many hospitals answered.

    The sum is kept in float64, folded chunk by chunk: a float32 weight times a hospital's example count is
    exact in float64, and the float64 additions lose ~1e-16 each, far below the float32 in which the weights
    travel; a float32 sum would lose ~1e-7 per addition, as much as the weights' own precision
    (benchmarks/aggregation.py measures both against exact arithmetic). The float64 sum costs twice the
    memory of one update, and its traffic is one read of each update and one read-write of the sum.
    """

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._sums = {name: np.zeros(np.shape(t), dtype=np.float64) for name, t in template.items()}
        self._scratch = np.empty(FOLD_CHUNK_ELEMENTS, dtype=np.float64)
        self.examples = 0
        self.updates = 0

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None:
        if set(weights) != set(self._sums):
            raise ValueError("updates hold different tensors")
        if num_examples <= 0:
            raise ValueError("an update must report training examples")
        for name, total in self._sums.items():
            flat_total = total.reshape(-1)
            flat = np.asarray(weights[name]).reshape(-1)
            for start in range(0, flat.size, FOLD_CHUNK_ELEMENTS):
                stop = min(start + FOLD_CHUNK_ELEMENTS, flat.size)
                weighted = self._scratch[:stop - start]
                np.multiply(flat[start:stop], num_examples, out=weighted, dtype=np.float64)
                flat_total[start:stop] += weighted
        self.examples += num_examples
        self.updates += 1

    def mean(self) -> Weights:
        """The example-weighted mean; the running sum is divided in place, so nothing may be added after."""
        if self.examples <= 0:
            raise ValueError("updates report no training examples")
        for total in self._sums.values():
            total /= self.examples
        self.examples = -1  # spent
        return self._sums


def aggregate_fedavg(updates: Sequence[ClientUpdate]) -> Weights:
    """Average of the hospitals' weights, each weighted by its number of training examples."""
    names = _names(updates)
    if sum(u.num_examples for u in updates) <= 0:
        raise ValueError("updates report no training examples")
    folded = WeightedMean({n: updates[0].weights[n] for n in names})
    for update in updates:
        folded.add(update.weights, update.num_examples)
    return folded.mean()


def _coordinatewise(updates: Sequence[ClientUpdate], reduce: Callable[[np.ndarray], np.ndarray],
                    chunk_bytes: int) -> Weights:
    """`reduce` (over axis 0 of the hospitals' stacked values) applied chunk by chunk of each tensor's flat
    elements: at most `chunk_bytes` of stacked values are held at once. Updates may be arrays read lazily
    (memory-mapped or file-backed), which are then read one chunk at a time."""
    names = _names(updates)
    chunk = max(1, chunk_bytes // (8 * len(updates)))
    result: Weights = {}
    for name in names:
        flats = [np.asarray(u.weights[name]).reshape(-1) for u in updates]
        out = np.empty(flats[0].size, dtype=np.float64)
        for start in range(0, out.size, chunk):
            stop = min(start + chunk, out.size)
            out[start:stop] = reduce(np.stack([f[start:stop] for f in flats]).astype(np.float64, copy=False))
        result[name] = out.reshape(np.shape(updates[0].weights[name]))
    return result


def aggregate_median(updates: Sequence[ClientUpdate], *, chunk_bytes: int = ROBUST_CHUNK_BYTES) -> Weights:
    """Coordinate-wise median of the hospitals' weights (robust to a minority of bad updates)."""
    return _coordinatewise(updates, lambda stacked: np.median(stacked, axis=0), chunk_bytes)


def aggregate_trimmed_mean(updates: Sequence[ClientUpdate], trim_fraction: float, *,
                           chunk_bytes: int = ROBUST_CHUNK_BYTES) -> Weights:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values of each weight."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    cut = int(trim_fraction * len(updates))

    def trimmed(stacked: np.ndarray) -> np.ndarray:
        if cut == 0:
            return stacked.mean(axis=0)
        # Only the cut positions need to be in place: a partition, not a full sort.
        ordered = np.partition(stacked, (cut, len(stacked) - cut - 1), axis=0)
        return ordered[cut:len(stacked) - cut].mean(axis=0)

    return _coordinatewise(updates, trimmed, chunk_bytes)


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


WEIGHTED_STRATEGIES = frozenset({"fedavg", "fedprox", "fedadam", "fedyogi"})


class RoundAggregation:
    """One fit round's aggregation, fed result by result as the coordinator accepts them (`add`) and finished
    when the round closes (`finish`). Weighted strategies fold each update into a running sum on arrival and
    keep nothing of it; robust ones need every hospital's value of each weight, so they keep the updates (as
    given: in memory, or arrays read lazily from files) and reduce them chunk by chunk at the close."""

    def __init__(self, config: StrategyConfig, current: Mapping[str, np.ndarray]) -> None:
        self.config = config
        self.current = current
        self._mean = WeightedMean(current) if config.name in WEIGHTED_STRATEGIES else None
        self._kept: list[ClientUpdate] = []

    @property
    def keeps_updates(self) -> bool:
        """Whether the updates it was given must stay readable until `finish` (robust strategies)."""
        return self._mean is None

    @property
    def updates(self) -> int:
        return self._mean.updates if self._mean is not None else len(self._kept)

    def add(self, update: ClientUpdate) -> None:
        if self._mean is not None:
            self._mean.add(update.weights, update.num_examples)
        else:
            _names([*self._kept[:1], update])  # the same tensors as the others
            self._kept.append(update)

    def finish(self, state: ServerOptimiserState) -> tuple[Weights, ServerOptimiserState]:
        """The new global weights (and the server optimiser's new state)."""
        if self._mean is None:
            if self.config.name == "median":
                return aggregate_median(self._kept), state
            return aggregate_trimmed_mean(self._kept, self.config.trim_fraction), state
        averaged = self._mean.mean()
        if self.config.name in ("fedavg", "fedprox"):
            return averaged, state
        variant: Literal["adam", "yogi"] = "adam" if self.config.name == "fedadam" else "yogi"
        return server_optimiser_step(self.current, averaged, state, self.config.server, variant=variant)


def aggregate(config: StrategyConfig, current: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate],
              state: ServerOptimiserState) -> tuple[Weights, ServerOptimiserState]:
    """The new global weights under `config`'s strategy (and the server optimiser's new state): a whole round's
    `RoundAggregation` at once."""
    _names(updates)
    round_aggregation = RoundAggregation(config, current)
    for update in updates:
        round_aggregation.add(update)
    return round_aggregation.finish(state)
