"""A run's differential privacy as the federation accounts for it: each hospital's DP-SGD plan (the same the
hospital computes from the same numbers), the ε each has spent, the report users see, and why a budget cannot be
met, refused before round 1. Opacus (and so torch) is imported only where a run has a privacy budget.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from health_mlops.fl.metadata import FitMetadata
from health_mlops.fl.run_config import PrivacyConfig, RunConfig
from health_mlops.fl.state import Run

if TYPE_CHECKING:  # fl/privacy imports Opacus and torch; the serving side reads run configs without them
    from health_mlops.fl.privacy import PrivacyPlan


def privacy_refusal(config: RunConfig, training_rows: Mapping[str, int]) -> str | None:
    """Why the run's privacy budget cannot be met, every hospital where it cannot (their training rows known
    from round 0) in one message, with a batch size that would meet it at all of them when there is one; or None
    (also without a budget)."""
    if config.privacy is None:
        return None
    from health_mlops.fl.privacy import BudgetRefused, batch_meeting_budget

    refused: dict[str, str] = {}
    batches: list[int] = []
    for hospital, rows in sorted(training_rows.items()):
        try:
            plan_for(config, rows)
        except BudgetRefused as reason:
            found = batch_meeting_budget(config.privacy, rows=rows, batch_size=config.batch_size_at(rows),
                                         rounds=config.rounds, local_epochs=config.local_epochs)
            refused[hospital] = str(reason) + ("" if found is None else f" (a batch of {found[0]} meets the budget "
                                                                      f"here, at noise multiplier {found[1]:.1f})")
            batches += [] if found is None else [found[0]]
    if not refused:
        return None
    reasons = "; ".join(f"at {hospital}: {reason}" for hospital, reason in refused.items())
    message = f"privacy budget refused at {len(refused)} of {len(training_rows)} hospitals: {reasons}"
    if len(batches) == len(refused):  # a batch that meets it at every refused site: does it at the others too?
        fixed = config.model_copy(update={"batch_size": min(batches), "privacy": config.privacy.model_copy(
            update={"sampling_rate": None})})
        try:
            for rows in training_rows.values():
                plan_for(fixed, rows)
        except BudgetRefused:
            return message
        message += f". --batch-size {min(batches)} meets the budget at every hospital"
    return message


def privacy_spent(run: Run) -> dict[str, float]:
    """The ε each hospital has spent so far, from the DP-SGD steps its fit results report (empty without DP)."""
    if run.config.privacy is None:
        return {}
    from health_mlops.fl.privacy import epsilon_spent  # Opacus needs torch: only where DP is used

    steps: dict[str, int] = dict.fromkeys(run.example_limits, 0)
    for record in run.history:
        for hospital, metadata in record.hospitals.items():
            if isinstance(metadata, FitMetadata):
                steps[hospital] += metadata.dp_steps or 0
    spent = {}
    for hospital, taken in steps.items():
        plan = plan_for(run.config, run.example_limits[hospital])
        spent[hospital] = epsilon_spent(plan.noise_multiplier, plan.sample_rate, taken, plan.delta)
    return spent


def privacy_report(run: Run) -> dict[str, Any] | None:
    """A run's privacy as its users see it (None without DP): the largest ε any hospital has spent so far, δ, the
    budget, and each hospital's ε and noise multiplier. `epsilon` is what the run may claim: every hospital's
    records are protected at least that well."""
    if run.config.privacy is None:
        return None
    spent = privacy_spent(run)
    budget = run.config.privacy
    return {"epsilon": max(spent.values(), default=0.0), "delta": budget.delta, "budget_epsilon": budget.epsilon,
            "max_grad_norm": budget.max_grad_norm,
            "hospitals": {h: {"epsilon": eps,
                              "noise_multiplier": plan_for(run.config, run.example_limits[h]).noise_multiplier,
                              "batch_size": run.config.batch_size_at(run.example_limits[h])}
                          for h, eps in spent.items()}}


def plan_for(config: RunConfig, rows: int) -> PrivacyPlan:
    """The DP-SGD plan of a hospital with `rows` training rows in a run with a privacy budget; the hospital
    computes the same from the same numbers."""
    assert config.privacy is not None
    return _plan(config.privacy, rows, config.batch_size_at(rows), config.rounds, config.local_epochs)


@functools.lru_cache(maxsize=256)
def _plan(privacy: PrivacyConfig, rows: int, batch_size: int, rounds: int, local_epochs: int) -> PrivacyPlan:
    # Planning searches the noise (tens of ms); a run view asks for every hospital's plan each time it is read.
    from health_mlops.fl.privacy import plan_privacy  # Opacus needs torch: only where DP is used

    return plan_privacy(privacy, rows=rows, batch_size=batch_size, rounds=rounds, local_epochs=local_epochs)
