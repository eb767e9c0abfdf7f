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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy.linalg.blas import saxpy

from health_mlops.fl.mapped import LOCKSTEP_ELEMENTS, blocks
from health_mlops.fl.run_config import ServerOptimiserConfig, StrategyConfig
from health_mlops.fl.strategy_table import STRATEGIES

Weights = dict[str, np.ndarray]


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


# Elements combined at a time in float64 (closing a weighted round, the server optimiser's step): a chunk's
# temporaries stay in the CPU cache, so no temporary grows with the model.
FOLD_CHUNK_ELEMENTS = 1 << 13
# Additions a float32 partial sum of WeightedMean takes before it is added one level up.
CASCADE_FANOUT = 16
# What a robust strategy holds of all hospitals' values at once (a block of coordinates, every hospital's value
# of each): bounded whatever the number of hospitals and the model size, and small enough to stay in cache.
ROBUST_CHUNK_BYTES = 4 * 1024 * 1024


class WeightedMean:
    """FedAvg's running sum: each update is folded in when it arrives (`add`), so closing a round is one pass
    over the model (`mean`), however many hospitals answered.

    The sum is a cascade of float32 partial sums. An update times its example count is added to level 0 in
    one fused pass (BLAS saxpy: the memory traffic of a plain `total += update`); a level that has taken
    CASCADE_FANOUT additions is added to the level above and cleared. No float32 partial sum ever holds more
    than 16 terms, so the rounding error does not grow with the number of hospitals as a single float32
    running sum's does; the levels are added in float64 once, at the close, and the mean is rounded to
    float32, the precision in which the weights travel. Measured by benchmarks/aggregation.py against exact
    arithmetic: within a few 1e-7 of the size of the summed values at 200 hospitals, where a float32 running
    sum is 30 times further off; a float64 running sum is exact but costs 3.5 times a plain sum (the cast and
    twice the bytes). Memory: one float32 copy of the model per level (two up to 256 hospitals).
    """

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._shapes = {name: np.shape(t) for name, t in template.items()}
        self._levels: list[dict[str, np.ndarray]] = []  # flat float32 partial sums
        self._additions: list[int] = []  # per level, since it was last cleared
        self.examples = 0
        self.updates = 0

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None:
        if set(weights) != set(self._shapes):
            raise ValueError("updates hold different tensors")
        if num_examples <= 0:
            raise ValueError("an update must report training examples")
        for name, shape in self._shapes.items():
            if np.size(weights[name]) != math.prod(shape):
                raise ValueError(f"{name} has {np.size(weights[name])} values, expected shape {list(shape)}")
        self._add_to_level(0, weights, float(num_examples))
        self.examples += num_examples
        self.updates += 1

    def _add_to_level(self, level: int, weights: Mapping[str, np.ndarray], factor: float) -> None:
        if level == len(self._levels):
            self._levels.append({name: np.zeros(math.prod(shape), dtype=np.float32)
                                 for name, shape in self._shapes.items()})
            self._additions.append(0)
        sums = self._levels[level]
        for name in self._shapes:
            for start, block in blocks(weights[name]):  # a mapped update is never resident as a whole
                # In place: a slice of a contiguous float32 array is one too.
                saxpy(np.asarray(block, dtype=np.float32), sums[name][start:start + block.size], a=factor)
        self._additions[level] += 1
        if self._additions[level] == CASCADE_FANOUT:
            self._add_to_level(level + 1, sums, 1.0)
            for flat in sums.values():
                flat.fill(0)
            self._additions[level] = 0

    def mean(self) -> Weights:
        """The example-weighted mean (float32); the sums are spent, so nothing may be added after."""
        if self.examples <= 0:
            raise ValueError("updates report no training examples")
        levels, self._levels = self._levels, []  # the upper levels are freed as soon as they are added in
        result: Weights = {}
        scratch = np.empty(FOLD_CHUNK_ELEMENTS, dtype=np.float64)
        for name, shape in self._shapes.items():
            out = levels[0][name]
            for start in range(0, out.size, FOLD_CHUNK_ELEMENTS):
                stop = min(start + FOLD_CHUNK_ELEMENTS, out.size)
                total = scratch[:stop - start]
                total[:] = out[start:stop]
                for upper in levels[1:]:
                    total += upper[name][start:stop]
                total /= self.examples
                out[start:stop] = total
            for upper in levels[1:]:
                del upper[name]
            result[name] = out.reshape(shape)
        self.examples = -1  # spent
        return result


def aggregate_fedavg(updates: Sequence[ClientUpdate]) -> Weights:
    """Average of the hospitals' weights, each weighted by its number of training examples."""
    names = _names(updates)
    if sum(u.num_examples for u in updates) <= 0:
        raise ValueError("updates report no training examples")
    folded = WeightedMean({n: updates[0].weights[n] for n in names})
    for update in updates:
        folded.add(update.weights, update.num_examples)
    return folded.mean()


def _coordinatewise(updates: Sequence[ClientUpdate], reduce_sorted: Callable[[np.ndarray], np.ndarray],
                    chunk_bytes: int) -> Weights:
    """`reduce_sorted` applied to blocks of coordinates, each row one coordinate's values from every hospital,
    sorted: the block is copied into one reused buffer (at most `chunk_bytes`) and sorted along its rows, which
    are contiguous. Updates may be arrays mapped from files (`mapped.map_file`), which are then read a block at a
    time and never resident as a whole.
    The result has the updates' precision (float32 when they all are)."""
    names = _names(updates)
    result: Weights = {}
    for name in names:
        flats = [np.asarray(u.weights[name]).reshape(-1) for u in updates]
        dtype = np.result_type(*flats, np.float32)
        rows = max(1, chunk_bytes // (dtype.itemsize * len(flats)))
        block = np.empty((min(rows, flats[0].size), len(flats)), dtype=dtype)
        out = np.empty(flats[0].size, dtype=dtype)
        # Every hospital's next block at once (a mapped update's block leaves memory when it has been copied).
        for parts in zip(*(blocks(flat, rows) for flat in flats)):
            start, stop = parts[0][0], parts[0][0] + parts[0][1].size
            sorted_values = block[:stop - start]
            for column, (_, values) in enumerate(parts):
                sorted_values[:, column] = values
            sorted_values.sort(axis=1)
            out[start:stop] = reduce_sorted(sorted_values)
        result[name] = out.reshape(np.shape(updates[0].weights[name]))
    return result


def aggregate_median(updates: Sequence[ClientUpdate], *, chunk_bytes: int = ROBUST_CHUNK_BYTES) -> Weights:
    """Coordinate-wise median of the hospitals' weights (robust to a minority of bad updates)."""
    middle = len(updates) // 2

    def median(rows: np.ndarray) -> np.ndarray:
        if len(updates) % 2:
            return rows[:, middle]
        return (rows[:, middle - 1].astype(np.float64) + rows[:, middle]) / 2

    return _coordinatewise(updates, median, chunk_bytes)


def aggregate_trimmed_mean(updates: Sequence[ClientUpdate], trim_fraction: float, *,
                           chunk_bytes: int = ROBUST_CHUNK_BYTES) -> Weights:
    """Coordinate-wise mean after dropping the `trim_fraction` largest and smallest values of each weight."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    cut = int(trim_fraction * len(updates))
    return _coordinatewise(updates, lambda rows: rows[:, cut:len(updates) - cut].mean(axis=1, dtype=np.float64),
                           chunk_bytes)


@dataclass(frozen=True)
class ServerOptimiserState:
    """First and second moments of the server optimiser, and how many steps it has taken."""

    first_moment: Weights = field(default_factory=dict)
    second_moment: Weights = field(default_factory=dict)
    steps: int = 0


def server_optimiser_step(current: Mapping[str, np.ndarray], averaged: Mapping[str, np.ndarray],
                          state: ServerOptimiserState, config: ServerOptimiserConfig, *,
                          variant: Literal["adam", "yogi"], overwrite_averaged: bool = False,
                          ) -> tuple[Weights, ServerOptimiserState]:
    """One FedAdam or FedYogi step from `current` toward the FedAvg aggregate `averaged`.

    Worked chunk by chunk in float64 (temporaries the size of a chunk); the new weights and moments are
    float32 arrays, the model's precision, and with `overwrite_averaged` the new weights are written over
    `averaged` (float32 arrays of the caller's own). `state` is left as it was (its moments may still be being
    written to a checkpoint)."""
    b1, b2 = config.beta_1, config.beta_2
    step = state.steps + 1
    if variant == "adam":  # Adam's bias correction folded into the step size, so the first rounds are not too timid
        eta = config.learning_rate * math.sqrt(1 - b2**step) / (1 - b1**step)
    else:
        eta = config.learning_rate
    new_weights: Weights = {}
    first: Weights = {}
    second: Weights = {}
    for name, base in current.items():
        shape = np.shape(base)
        flat_target = np.asarray(averaged[name]).reshape(-1)
        old_m, old_v = (np.asarray(moments[name]).reshape(-1) if name in moments else None
                        for moments in (state.first_moment, state.second_moment))
        weights_out = flat_target if overwrite_averaged else np.empty(flat_target.size, dtype=np.float32)
        m_out, v_out = np.empty(flat_target.size, dtype=np.float32), np.empty(flat_target.size, dtype=np.float32)
        for block_start, base_block in blocks(base, LOCKSTEP_ELEMENTS):  # the current weights may be mapped
            for offset in range(0, base_block.size, FOLD_CHUNK_ELEMENTS):
                base64 = base_block[offset:offset + FOLD_CHUNK_ELEMENTS].astype(np.float64)
                chunk = slice(block_start + offset, block_start + offset + base64.size)
                delta = flat_target[chunk] - base64
                m = (1 - b1) * delta
                if old_m is not None:
                    m += b1 * old_m[chunk]
                squared = delta * delta
                v = old_v[chunk].astype(np.float64) if old_v is not None else np.zeros_like(squared)
                if variant == "adam":
                    v = b2 * v + (1 - b2) * squared
                else:
                    v -= (1 - b2) * squared * np.sign(v - squared)
                weights_out[chunk] = base64 + eta * m / (np.sqrt(v) + config.tau)
                m_out[chunk], v_out[chunk] = m, v
        new_weights[name], first[name], second[name] = (a.reshape(shape) for a in (weights_out, m_out, v_out))
    return new_weights, replace(state, first_moment=first, second_moment=second, steps=step)


class RoundAggregation:
    """One fit round's aggregation, fed result by result as the coordinator accepts them (`add`) and finished
    when the round closes (`finish`). Weighted strategies fold each update into a running sum on arrival and
    keep nothing of it; robust ones need every hospital's value of each weight, so they keep the updates (as
    given: in memory, or arrays read lazily from files) and reduce them chunk by chunk at the close."""

    def __init__(self, config: StrategyConfig, current: Mapping[str, np.ndarray]) -> None:
        self.config = config
        self.current = current
        self._mean = WeightedMean(current) if STRATEGIES[config.name].weighted else None
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
            if STRATEGIES[self.config.name].combination == "median":
                return aggregate_median(self._kept), state
            return aggregate_trimmed_mean(self._kept, self.config.trim_fraction), state
        return apply_mean(self.config, self.current, self._mean.mean(), state)


def apply_mean(config: StrategyConfig, current: Mapping[str, np.ndarray], averaged: Weights,
               state: ServerOptimiserState) -> tuple[Weights, ServerOptimiserState]:
    """A weighted strategy's new global weights from the round's example-weighted mean (FedAvg's sum, or the sum
    secure aggregation unmasks): the mean itself, or the server optimiser's step towards it (`averaged` is
    overwritten)."""
    kind = STRATEGIES[config.name]
    if not kind.weighted:
        raise ValueError(f"{config.name} needs every update, not their mean")
    if kind.server_optimiser is None:
        return averaged, state
    return server_optimiser_step(current, averaged, state, config.server, variant=kind.server_optimiser,
                                 overwrite_averaged=True)


def aggregate(config: StrategyConfig, current: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate],
              state: ServerOptimiserState) -> tuple[Weights, ServerOptimiserState]:
    """The new global weights under `config`'s strategy (and the server optimiser's new state): a whole round's
    `RoundAggregation` at once."""
    _names(updates)
    round_aggregation = RoundAggregation(config, current)
    for update in updates:
        round_aggregation.add(update)
    return round_aggregation.finish(state)
