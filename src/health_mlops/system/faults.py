"""Crash points: the steps at which a test has the aggregator killed, to prove it recovers from a crash at
exactly that step (SIGKILL, as the kernel's OOM killer or a lost machine would: no cleanup runs).

`HEALTH_MLOPS_CRASH_AT=<point>[:<n>]` (`config.Settings.crash_at`) kills the aggregator the n-th time (default
the first) it reaches `point`. Unset, as in any deployment, a crash point is one comparison.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset({
    "result_accepted",  # a result is accepted and durable; the hospital has not been answered
    "checkpoint_unrenamed",  # the new state is written to its temporary file, not yet renamed over the old one
    "round_closed_weights_unwritten",  # a round closed in memory; neither its weights nor the state are written
    "model_registered_unrecorded",  # the model is registered in MLflow; that it was is not yet recorded
})

_armed: tuple[str, int] | None = None
_hits = 0


def arm(setting: str | None) -> None:
    """Kill this process at a crash point (`<point>[:<n>]`), or never (None)."""
    global _armed, _hits
    _hits = 0
    if not setting:
        _armed = None
        return
    point, _, count = setting.partition(":")
    if point not in POINTS:
        raise ValueError(f"HEALTH_MLOPS_CRASH_AT: unknown crash point {point!r}; one of {sorted(POINTS)}")
    if count and (not count.isdigit() or int(count) < 1):
        raise ValueError(f"HEALTH_MLOPS_CRASH_AT: {count!r} is not a positive count")
    _armed = (point, int(count or 1))


def crash_point(point: str) -> None:
    global _hits
    if _armed is not None and _armed[0] == point:
        _hits += 1
        if _hits == _armed[1]:
            os.kill(os.getpid(), signal.SIGKILL)
