"""Differential privacy for a federated run: DP-SGD at each hospital, and its budget accounted over the run.

A hospital trains with DP-SGD as Opacus implements it: each record's gradient is clipped to `max_grad_norm`,
Gaussian noise of `noise_multiplier × max_grad_norm` is added to each batch's sum, and batches are Poisson
samples of the hospital's training rows (rate = batch size / rows). The privacy loss of the whole run at one
hospital is the composition of every step of every round, accounted with Rényi DP (Opacus' RDP accountant):
`plan_privacy` finds the noise that keeps it within (ε, δ) for the run's rounds, local epochs and that
hospital's row count, and refuses a budget that cannot be met with a usable amount of noise. Evaluation scores
only test rows, which DP-SGD never touches, so it spends nothing. The round-0 statistics (counts, sums, small
categories suppressed) are not covered by this budget.

Pure: no network; the coordinator plans, the hospital trains, both through this module.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from health_mlops.errors import FederationError
from health_mlops.fl.run_config import MAX_NOISE_MULTIPLIER, PrivacyConfig
from health_mlops.ml.directions import Directions
from health_mlops.ml.train import TrainResult, loss_function, weight_views
from health_mlops.ml.train_config import TrainConfig

# The planned run may spend at most this much more than asked, from the noise search's tolerance.
EPSILON_TOLERANCE = 0.01


class BudgetRefused(FederationError):
    """A privacy budget that cannot be met; the message says why and what would."""


@dataclass(frozen=True)
class PrivacyPlan:
    """How one hospital spends the run's budget."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # each record's chance to be in a batch
    steps: int  # optimiser steps over the whole run
    epsilon: float  # what the whole run spends (≤ the budget)
    delta: float


@functools.lru_cache(maxsize=1024)  # a run view accounts every hospital each time it is read
def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The ε of `steps` DP-SGD steps at this noise and sampling rate, by the RDP accountant."""
    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound holds, if not the tightest
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def _noise_needed(config: PrivacyConfig, sample_rate: float, steps: int) -> float | None:
    """The least noise that meets the budget over `steps` steps at `sample_rate` (None: none does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=config.epsilon, target_delta=config.delta,
                                              sample_rate=sample_rate, steps=steps, accountant="rdp",
                                              epsilon_tolerance=EPSILON_TOLERANCE))
    except ValueError:
        return None


def batch_meeting_budget(config: PrivacyConfig, *, rows: int, batch_size: int, rounds: int,
                         local_epochs: int) -> tuple[int, float] | None:
    """The largest batch below `batch_size` (halving) whose run meets the budget at a useful noise, and that
    noise: a smaller batch samples each record less often, so the same ε needs less noise per step. Each
    candidate is first tested at the largest useful noise (one accountant call); only the batch found is planned."""
    batch = min(batch_size, rows - 1) // 2 if batch_size >= rows else batch_size // 2
    while batch >= 1:
        sample_rate, steps = batch / rows, rounds * local_epochs * math.ceil(rows / batch)
        if epsilon_spent(MAX_NOISE_MULTIPLIER, sample_rate, steps, config.delta) <= config.epsilon:
            noise = _noise_needed(config, sample_rate, steps)
            return (batch, noise) if noise is not None else None
        batch //= 2
    return None


def plan_privacy(config: PrivacyConfig, *, rows: int, batch_size: int, rounds: int, local_epochs: int) -> PrivacyPlan:
    """The noise that keeps a hospital with `rows` training rows within the budget over the whole run; refused
    with the reason and the flags that would meet it (`batch_meeting_budget` finds a batch that does)."""
    if rows <= batch_size:
        raise BudgetRefused(f"{rows} training rows cannot sample batches of {batch_size}: "
                            f"lower --batch-size below {rows}")
    sample_rate = batch_size / rows
    steps = rounds * local_epochs * math.ceil(rows / batch_size)
    noise = config.noise_multiplier
    if noise is None:
        noise = _noise_needed(config, sample_rate, steps)
        if noise is None:
            raise BudgetRefused(f"ε = {config.epsilon:g} at δ = {config.delta:g} cannot be met over {steps} steps "
                                f"at sampling rate {sample_rate:.4f}: allow a larger ε (--dp-epsilon), or train "
                                "fewer rounds (--rounds) or epochs (--epochs)")
        if noise > MAX_NOISE_MULTIPLIER:
            raise BudgetRefused(f"ε = {config.epsilon:g} at δ = {config.delta:g} over {rounds} rounds × "
                                f"{local_epochs} local epochs at {rows} rows needs noise multiplier {noise:.1f} "
                                f"(at most {MAX_NOISE_MULTIPLIER:g} is useful): allow a larger ε (--dp-epsilon), or "
                                "train fewer rounds (--rounds) or epochs (--epochs)")
    spent = epsilon_spent(noise, sample_rate, steps, config.delta)
    if spent > config.epsilon + EPSILON_TOLERANCE:
        raise BudgetRefused(f"noise multiplier {noise:g} spends ε = {spent:.2f} over the run, more than the "
                            f"{config.epsilon:g} allowed: raise the noise or leave it unset to have it planned")
    return PrivacyPlan(noise, config.max_grad_norm, sample_rate, steps, spent, config.delta)


def _quiet_known_warnings() -> None:
    """Two warnings every DP-SGD round would print, filtered by message, process-wide (`catch_warnings` is not
    thread-safe, and the loopback harness trains hospitals in threads; adding a filter again replaces it). Opacus
    says its noise comes from torch's generator, not a cryptographic one (secure_mode, much slower: a later
    choice); torch, that the first layer's inputs need no gradient (they are data)."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


def train_model_private(model: nn.Module, features: np.ndarray, target: np.ndarray, task: str,
                        config: TrainConfig, plan: PrivacyPlan, *, epochs: int,
                        directions: Directions | None = None,
                        scale: np.ndarray | None = None) -> tuple[TrainResult, int]:
    """`epochs` epochs of DP-SGD (Adam on the noisy clipped gradients) in place; the result and the number of
    optimiser steps taken (what the round spends). With `directions`, each step ends with the weights projected
    into the allowed set (post-processing of private weights: it costs no privacy)."""
    if config.proximal_mu > 0:  # the proximal term acts on the parameters, outside the per-record gradients
        raise BudgetRefused("FedProx's proximal term is not private under DP-SGD: use fedavg or a server optimiser")
    started = time.perf_counter()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).reshape(-1, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=config.batch_size,
                                         generator=torch.Generator().manual_seed(config.seed))
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay_for(len(x)))
    loss_fn = loss_function(task)
    _quiet_known_warnings()
    model.train()
    engine = PrivacyEngine(accountant="rdp")
    private, optimiser, loader = engine.make_private(
        module=model, optimizer=optimiser, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, poisson_sampling=True)
    private.train()
    views = weight_views(model)  # the same tensors the private wrapper trains

    def constrain() -> None:
        if directions is not None:
            directions.project_weights(views, scale)

    constrain()
    steps, total, seen = _private_epochs(private, optimiser, loader, loss_fn, epochs, constrain)
    model.eval()
    return TrainResult(examples=len(x), mean_loss=total / max(seen, 1), seconds=time.perf_counter() - started), steps


def _private_epochs(private: nn.Module, optimiser: torch.optim.Optimizer, loader: torch.utils.data.DataLoader,
                    loss_fn: nn.Module, epochs: int, after_step: Callable[[], None]) -> tuple[int, float, int]:
    """(steps, the last epoch's summed loss, its records); the hooks come off at the end."""
    steps, total, seen = 0, 0.0, 0
    try:
        for _ in range(epochs):
            total, seen = 0.0, 0
            for batch_x, batch_y in loader:
                optimiser.zero_grad(set_to_none=True)
                output = private(batch_x)
                # A Poisson sample may be empty: its zero per-record gradients still get their noise, and the
                # step counts in the budget.
                loss = loss_fn(output, batch_y) if len(batch_x) else output.sum()
                loss.backward()
                total += float(loss.detach()) * len(batch_x)
                seen += len(batch_x)
                optimiser.step()
                after_step()
                steps += 1
    finally:
        private._close()  # type: ignore[operator]  # the hooks come off: the model is a plain module again
    return steps, total, seen
