"""Risk that moves the way medicine says: the spec's `direction`s enforced on the model's weights.

A feature may declare `direction: increasing` (the prediction never falls as its value rises) or `decreasing`; a
categorical feature's direction follows the order of its categories. The model is kept monotone by construction,
with constrained weights (projected gradient descent: every optimiser step, and every aggregation on the server,
ends by mapping the weights back into the constrained set):

- first layer: an increasing numeric input's weights are >= 0, a decreasing one's <= 0 (for a direction from a
  value on, the weights of the input's part beyond that value: `data.preprocess.numeric_parts`); an ordered
  categorical feature's one-hot columns have effects (weight / the column's scale: its inputs are standardised)
  that never fall along the order, in every hidden unit;
- every later layer's weights are >= 0 (with ReLU, a monotone activation, a hidden unit's output then moves with
  each directional input the same way, and so does the sum the output takes).

Why constrained weights rather than a monotone architecture (lattices, min-max networks): the model stays the
Sequential of Linear layers and ReLUs that everything else handles (FedAvg, secure aggregation, DP-SGD in
Opacus, the ONNX graph), and the set of allowed weights is one that a weighted mean keeps (so is a coordinate-wise
median or trimmed mean), so FedAvg's aggregate needs no further step. Free inputs keep their first-layer weights
free; the price is that the network is convex in them, which a risk built from thresholds (a fever, hypoxia)
fits. The arrays are projected in place, numpy over the tensors' own memory: no copy per optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from health_mlops.data.preprocess import encoded_columns, numeric_parts
from health_mlops.spec import DatasetSpec


@dataclass(frozen=True)
class Directions:
    """The constraints of one spec, in its model's encoded columns."""

    signs: np.ndarray  # per encoded column: +1 increasing, -1 decreasing, 0 free (numeric features)
    ordered: tuple[tuple[int, ...], ...]  # one-hot columns whose effects must not fall, in that order
    hidden_non_negative: bool  # an MLP: every layer after the first >= 0

    @classmethod
    def of(cls, spec: DatasetSpec) -> Directions | None:
        """The spec's directions, or None when it declares none (the model is then unconstrained)."""
        columns = encoded_columns(spec)
        index = {name: j for j, name in enumerate(columns)}
        signs = np.zeros(len(columns))
        ordered: list[tuple[int, ...]] = []
        for feature in spec.features:
            if feature.direction is None:
                continue
            step = 1 if feature.direction == "increasing" else -1
            if feature.type == "numeric":  # the part the direction holds on (all of it, or from a value on)
                signs[index[numeric_parts(feature)[-1][0]]] = step
            else:
                group = tuple(index[f"{feature.name}={c}"] for c in feature.categories or ())
                ordered.append(group[::step])
        if not signs.any() and not ordered:
            return None
        return cls(signs, tuple(ordered), hidden_non_negative=spec.model.kind == "mlp")

    def project(self, layers: list[np.ndarray], scale: np.ndarray | None = None) -> None:
        """Map the Linear layers' weight matrices (in order; the first's columns are the encoded inputs) into the
        allowed set, in place. `scale`: each encoded column's standardisation (ones if unknown yet).

        This runs after every optimiser step, so it works on whole arrays: one clip for the signs, and the ordered
        features' groups of one size at once."""
        first = layers[0]
        lower, upper = self._sign_bounds
        np.clip(first, lower, upper, out=first)
        for groups in self._ordered_by_size:  # (groups, categories): column indices
            divisor = np.ones(groups.shape) if scale is None else np.asarray(scale, dtype=np.float64)[groups]
            effects = first[:, groups] / divisor  # (units, groups, categories)
            if (effects[..., :-1] <= effects[..., 1:]).all():
                continue  # already in order: nothing to pool
            for _ in range(groups.shape[1]):  # adjacent violators pooled to their mean (close to the projection)
                for i in range(groups.shape[1] - 1):
                    left, right = effects[..., i], effects[..., i + 1]
                    pooled = (left + right) / 2  # where left > right both become it; elsewhere both stay
                    np.minimum(left, pooled, out=left)
                    np.maximum(right, pooled, out=right)
                if (effects[..., :-1] <= effects[..., 1:]).all():
                    break
            first[:, groups] = np.maximum.accumulate(effects, axis=2) * divisor  # ordered exactly
        if self.hidden_non_negative:
            for later in layers[1:]:
                np.maximum(later, 0.0, out=later)

    @cached_property
    def _sign_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per encoded column, the interval a first-layer weight may take: [0, inf) increasing, (-inf, 0] falling."""
        return np.where(self.signs > 0, 0.0, -np.inf), np.where(self.signs < 0, 0.0, np.inf)

    @cached_property
    def _ordered_by_size(self) -> list[np.ndarray]:
        """The ordered groups as index arrays, one (groups, categories) array per number of categories."""
        sizes = sorted({len(group) for group in self.ordered})
        return [np.array([group for group in self.ordered if len(group) == size]) for size in sizes]

    def project_weights(self, weights: MutableMapping[str, np.ndarray], scale: np.ndarray | None = None) -> None:
        """`project` on a Sequential's weights by name ("0.weight", "2.weight", ...), in place."""
        self.project(linear_weights(weights), scale)

    def initialise(self, weights: MutableMapping[str, np.ndarray]) -> None:
        """Start inside the allowed set without losing units: directional columns and later layers take their
        initial weights' magnitudes with the allowed sign (clamping would zero half of them)."""
        layers = linear_weights(weights)
        first = layers[0]
        for j in np.flatnonzero(self.signs):
            first[:, j] = self.signs[j] * np.abs(first[:, j])
        if self.hidden_non_negative:
            for later in layers[1:]:
                np.abs(later, out=later)
        self.project(layers)


def convex_units(width: int) -> int:
    """How many of a hidden layer's units are ReLU, the rest min(x, 0) (`ml.model.SplitReLU`; the export's too)."""
    return (width + 1) // 2


def weight_constraint(spec: DatasetSpec) -> Callable[[MutableMapping[str, np.ndarray], Any], None] | None:
    """What the coordinator applies to each round's aggregate (`fl.coordinator.WeightConstraint`), or None."""
    directions = Directions.of(spec)
    if directions is None:
        return None
    found = directions

    def constrain(weights: MutableMapping[str, np.ndarray], preprocessing: Any) -> None:
        found.project_weights(weights, np.asarray(preprocessing.scale))

    return constrain


def linear_weights(weights: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The weight matrices of a Sequential of Linear layers, in layer order (the arrays themselves, not copies)."""
    found = sorted((int(name.split(".")[0]), array) for name, array in weights.items() if name.endswith(".weight"))
    return [array for _, array in found]
