"""Local training: the loop each hospital runs (pooled and local baselines use it too)."""

from __future__ import annotations

import copy
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
    steps: int = 0  # optimiser steps taken
    validation_loss: float | None = None  # of the weights kept (the best seen), with validation rows
    stopped_early: bool = False


# Early stopping checks the validation loss every epoch, but at least this many steps apart: a small site's epoch
# is one or two steps, and a loss measured that often is mostly noise.
MIN_STEPS_BETWEEN_CHECKS = 20


@torch.no_grad()
def mean_loss(model: nn.Module, features: np.ndarray, target: np.ndarray, task: str) -> float:
    """The model's mean loss on these rows (the training loss function, no proximal term)."""
    model.eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).reshape(-1, 1)
    return float(loss_function(task)(model(x), y))


def loss_function(task: str) -> nn.Module:
    return nn.BCEWithLogitsLoss() if task == "binary" else nn.MSELoss()


def weight_views(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as numpy arrays over the tensors' own memory (writing them writes the model)."""
    return {name: parameter.detach().numpy() for name, parameter in model.named_parameters()}


def train_model(model: nn.Module, features: np.ndarray, target: np.ndarray, task: str,
                config: TrainConfig, on_progress: Callable[[float], None] | None = None, *,
                directions: Directions | None = None, scale: np.ndarray | None = None,
                validation: tuple[np.ndarray, np.ndarray] | None = None) -> TrainResult:
    """Train in place with Adam on shuffled mini-batches; with `proximal_mu` > 0 this is FedProx's local step.

    The anchor for the proximal term is the model's weights on entry (the global model of the round). With
    `max_steps`, training takes exactly that many steps, over as many epochs as they need (the last one cut
    short). `on_progress(share)` is called after each epoch with the share of the budget done (for progress
    bars; 1.0 at the end, early or not). With `directions`, every step ends with the weights projected back into
    the allowed set (`scale`: the inputs' standardisation).

    With `validation` rows (features, target) and `config.patience`, the validation loss is checked after each
    epoch (at least `MIN_STEPS_BETWEEN_CHECKS` steps apart); training stops after `patience` checks without a
    better one, and the model ends with the best weights checked.
    """
    started = time.perf_counter()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).reshape(-1, 1)
    loss_fn = loss_function(task)
    # fused: one kernel for all parameters' updates, a fifth of a small model's step on one CPU thread
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay_for(len(x)), fused=True)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(config.seed)
    n = len(x)
    batches = max(math.ceil(n / config.batch_size), 1)
    epochs = config.epochs if config.max_steps is None else math.ceil(config.max_steps / batches)
    steps_left = config.max_steps if config.max_steps is not None else epochs * batches
    budget = max(steps_left, 1)
    last_epoch_loss = float("nan")
    views = weight_views(model)
    if directions is not None:
        directions.project_weights(views, scale)
    stopping = validation is not None and len(validation[1]) > 0 and config.patience is not None
    best_loss, best_weights, checks_since_best, steps_since_check, steps = math.inf, None, 0, 0, 0
    stopped = False
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
            steps += 1
            steps_since_check += 1
        last_epoch_loss = total / max(seen, 1)
        if on_progress is not None:
            on_progress(steps / budget)
        if stopping and (steps_since_check >= MIN_STEPS_BETWEEN_CHECKS or steps_left == 0 or epoch == epochs):
            assert validation is not None and config.patience is not None
            steps_since_check = 0
            loss = mean_loss(model, *validation, task)
            model.train()
            if loss < best_loss:
                best_loss, best_weights, checks_since_best = loss, copy.deepcopy(model.state_dict()), 0
            else:
                checks_since_best += 1
                if checks_since_best >= config.patience:
                    stopped = True
                    break
    if on_progress is not None and stopped:
        on_progress(1.0)
    if best_weights is not None:
        model.load_state_dict(best_weights)
    model.eval()
    return TrainResult(examples=n, mean_loss=last_epoch_loss, seconds=time.perf_counter() - started, steps=steps,
                       validation_loss=None if best_weights is None else best_loss, stopped_early=stopped)


@torch.no_grad()
def predict(model: nn.Module, features: np.ndarray, task: str) -> np.ndarray:
    """Probabilities for binary tasks, standardised values for regression (float64)."""
    model.eval()
    out = model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).reshape(-1)
    if task == "binary":
        out = torch.sigmoid(out)
    return out.double().numpy()
