"""A model's starting weights, drawn without torch: the aggregator starts every run and does not load torch.

The draws are exactly torch's: after `torch.manual_seed(seed)`, an `nn.Linear(fan_in, fan_out)` takes its weight
from `kaiming_uniform_(a=√5)` and its bias from U(−1/√fan_in, 1/√fan_in), each number from one 32-bit output of
torch's CPU generator (MT19937 seeded with `seed`, as numpy's legacy `RandomState(seed)` is): its low 24 bits scaled
to [0, 1), then to the bounds (cast to float32) in double precision, then stored as float32. A test holds these
equal to torch's own, bit for bit, for every model family, so a model trained from them is the one torch would
have started.
"""

from __future__ import annotations

import math

import numpy as np

from health_mlops.data.preprocess import encoded_columns
from health_mlops.ml.directions import Directions
from health_mlops.spec import DatasetSpec, ModelDefaults

_MANTISSA_BITS = 24  # what torch keeps of each 32-bit draw for a float32


def layer_sizes(config: ModelDefaults, n_inputs: int) -> list[tuple[int, int]]:
    """(inputs, outputs) of each Linear layer: one for a linear model, the hidden layers and the output for an MLP."""
    widths = [n_inputs, *(() if config.kind == "linear" else config.hidden), 1]
    return list(zip(widths[:-1], widths[1:], strict=True))


def linear_layer_names(config: ModelDefaults) -> list[str]:
    """The Sequential's names of the Linear layers' modules: an MLP puts an activation after each hidden layer."""
    count = 1 if config.kind == "linear" else len(config.hidden) + 1
    return [str(2 * i) for i in range(count)]


def seeded_weights(config: ModelDefaults, n_inputs: int, seed: int) -> dict[str, np.ndarray]:
    """The architecture's weights as `torch.manual_seed(seed)` then building it would draw them (float32)."""
    draws = np.random.RandomState(seed % 2**32)  # torch keeps the seed's low 32 bits too
    weights: dict[str, np.ndarray] = {}
    for name, (fan_in, fan_out) in zip(linear_layer_names(config), layer_sizes(config, n_inputs), strict=True):
        weights[f"{name}.weight"] = _uniform(draws, (fan_out, fan_in), _kaiming_bound(fan_in))
        weights[f"{name}.bias"] = _uniform(draws, (fan_out,), 1 / math.sqrt(fan_in))
    return weights


def initial_weights(spec: DatasetSpec, seed: int) -> dict[str, np.ndarray]:
    """A federation's round-1 global model (and every baseline's start): the spec's model, seeded, as float64
    arrays, inside the spec's directions."""
    weights = {name: array.astype(np.float64)
               for name, array in seeded_weights(spec.model, len(encoded_columns(spec)), seed).items()}
    directions = Directions.of(spec)
    if directions is not None:
        directions.initialise(weights)
    return weights


def _kaiming_bound(fan_in: int) -> float:
    """`nn.init.kaiming_uniform_(a=√5)`'s bound, computed as torch computes it (1/√fan_in up to rounding)."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def _uniform(draws: np.random.RandomState, shape: tuple[int, ...], bound: float) -> np.ndarray:
    raw = draws.randint(0, 2**32, size=int(np.prod(shape)), dtype=np.uint64)
    unit = (raw & ((1 << _MANTISSA_BITS) - 1)).astype(np.float64) / (1 << _MANTISSA_BITS)
    low, high = np.float64(np.float32(-bound)), np.float64(np.float32(bound))
    return (unit * (high - low) + low).astype(np.float32).reshape(shape)
