"""The models: one output unit (a logit for binary tasks, a standardised value for regression)."""

from __future__ import annotations

import torch
from torch import nn

from health_mlops.spec import ModelDefaults


def build_model(config: ModelDefaults, n_inputs: int, *, seed: int = 0) -> nn.Module:
    """A linear model (logistic or linear regression) or an MLP with ReLU hidden layers.

    Seeded so that every hospital of a federation, and every baseline, starts from the same weights.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if config.kind == "linear":
            return nn.Sequential(nn.Linear(n_inputs, 1))
        layers: list[nn.Module] = []
        width = n_inputs
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)
    finally:
        torch.random.set_rng_state(generator_state)


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's parameters, by name."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(weights, strict=True)
