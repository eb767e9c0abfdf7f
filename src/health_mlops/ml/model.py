"""The models: one output unit (a logit for binary tasks, a standardised value for regression)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from health_mlops.data.preprocess import encoded_columns
from health_mlops.spec import DatasetSpec, ModelDefaults


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


def weights_as_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as float64 arrays: the form updates travel and are averaged in."""
    return {name: tensor.numpy().astype(np.float64) for name, tensor in get_weights(model).items()}


def model_with_weights(config: ModelDefaults, n_inputs: int, weights: dict[str, np.ndarray]) -> nn.Module:
    """A model of the task's architecture holding the given (e.g. global) weights."""
    model = build_model(config, n_inputs)
    set_weights(model, {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()})
    return model


def initial_weights(spec: DatasetSpec, seed: int) -> dict[str, np.ndarray]:
    """A federation's round-1 global model: the task's model, seeded, as arrays."""
    return weights_as_numpy(build_model(spec.model, len(encoded_columns(spec)), seed=seed))
