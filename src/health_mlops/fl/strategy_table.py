"""The federation's strategies and what each one is: the one table every question about a strategy's nature reads.

How a strategy combines the hospitals' updates (`fl.strategies` implements each combination), whether the server
keeps state between rounds, what differential privacy and secure aggregation allow with it, and which of
`StrategyConfig`'s options it reads. Plain data that imports nothing of the project, so the settings, the run's
config, the CLI's choices, the coordinator and the hospital all read it without loading each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean"]
# How the round's updates become one: their mean weighted by the hospitals' examples, or coordinate-wise
# statistics that weigh every hospital the same (so that one cannot drag the model however many rows it claims).
Combination = Literal["weighted_mean", "median", "trimmed_mean"]


@dataclass(frozen=True)
class StrategyKind:
    summary: str
    combination: Combination
    # A server optimiser's step from the weighted mean (Reddi et al. 2021); its moments are state, checkpointed.
    server_optimiser: Literal["adam", "yogi"] | None = None
    # Each hospital adds a proximal term to its local loss (Li et al. 2020): outside DP-SGD's per-record gradients.
    proximal: bool = False
    # The `StrategyConfig` fields it reads; a value for another is refused.
    options: frozenset[str] = frozenset()

    @property
    def weighted(self) -> bool:
        return self.combination == "weighted_mean"

    @property
    def robust(self) -> bool:
        return not self.weighted

    @property
    def server_state(self) -> bool:
        return self.server_optimiser is not None

    @property
    def with_secure_aggregation(self) -> bool:
        """Secure aggregation reveals only the sum of the updates: enough for a mean, not for a median."""
        return self.weighted

    @property
    def with_differential_privacy(self) -> bool:
        return not self.proximal


STRATEGIES: dict[StrategyName, StrategyKind] = {
    "fedavg": StrategyKind("the examples-weighted mean of the hospitals' weights", "weighted_mean"),
    "fedprox": StrategyKind("FedAvg with a proximal term in each hospital's training", "weighted_mean",
                            proximal=True, options=frozenset({"proximal_mu"})),
    "fedadam": StrategyKind("an Adam step on the server towards the FedAvg mean", "weighted_mean",
                            server_optimiser="adam", options=frozenset({"server"})),
    "fedyogi": StrategyKind("a Yogi step on the server towards the FedAvg mean", "weighted_mean",
                            server_optimiser="yogi", options=frozenset({"server"})),
    "median": StrategyKind("the coordinate-wise median (robust)", "median"),
    "trimmed_mean": StrategyKind("the coordinate-wise mean without each end's share (robust)", "trimmed_mean",
                                 options=frozenset({"trim_fraction"})),
}


def strategy_names(*, where: Callable[[StrategyKind], bool] = lambda kind: True) -> list[str]:
    """The strategies' names in the table's order, those `where` holds for."""
    return [name for name, kind in STRATEGIES.items() if where(kind)]
