"""Local training: the loop each hospital runs (pooled and local baselines use it too)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from health_mlops.ml.directions import Directions
from health_mlops.ml.train_config import TrainConfig


@dataclass(frozen=True)
class TrainResult:
    examples: int
    mean_loss: float  # mean training loss of the last epoch, without the proximal term
    seconds: float


def loss_function(task: str) -> nn.Module:
    return nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()


def weight_views(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays over the tensors' own memory (writing them writes the model)."""
    return {name: parameter.detach().numpy() for name, parameter in model.named_parameters()}


def train_model(model: nn.Module, features: np.ndarray, target: np.ndarray, task: str,
                config: TrainConfig, on_epoch: Callable[[int], None] | None = None, *,
                directions: Directions | None = None, scale: np.ndarray | None = None) -> TrainResult:
    """Train in place with Adam on shuffled mini-batches; with `proximal_mu` > 0 this is FedProx's local step.

    The anchor for the proximal term is the model's weights on entry (the global model of the round). With
    `max_steps`, training takes exactly that many steps, over as many epochs as they need (the last one cut
    short). `on_epoch(epoch)` is called after each epoch (for progress bars). With `directions`, every step ends
    with the weights projected back into the allowed set (`scale`: the inputs' standardisation).
    """
    started = time.perf_counter()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).reshape(-1, 1)
    loss_fn = loss_function(task)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(config.seed)
    n = len(x)
    batches = max(math.ceil(n / config.batch_size), 1)
    epochs = config.epochs if config.max_steps is None else math.ceil(config.max_steps / batches)
    steps_left = config.max_steps if config.max_steps is not None else epochs * batches
    last_epoch_loss = float("nan")
    views = weight_views(model)
    if directions is not None:
        directions.project_weights(views, scale)
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator)
        total, seen = 0.0, 0
        for start in range(0, n, config.batch_size):
            if steps_left == 0:
                break
            steps_left -= 1
            batch = order[start:start + config.batch_size]
            seen += len(batch)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch]), y[batch])
            total += float(loss.detach()) * len(batch)
            if anchor:
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                loss = loss + 0.5 * config.proximal_mu * proximal
            loss.backward()
            optimiser.step()
            if directions is not None:
                directions.project_weights(views, scale)
        last_epoch_loss = total / max(seen, 1)
        if on_epoch is not None:
            on_epoch(epoch)
    model.eval()
    return TrainResult(examples=n, mean_loss=last_epoch_loss, seconds=time.perf_counter() - started)


@torch.no_grad()
def predict(model: nn.Module, features: np.ndarray, task: str) -> np.ndarray:
    """Probabilities for binary tasks, standardised values for regression (float64)."""
    model.eval()
    out = model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).reshape(-1)
    if task == "binary":
        out = torch.sigmoid(out)
    return out.double().numpy()
