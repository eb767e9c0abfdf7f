"""What the dashboard's tabs share: the state their callbacks read (the spec, the predictor, the registry, the
federation's sources, the private scratch folder), the champion's model reports, and the helpers of more than one tab.

Each tab's module adds its callbacks to `DashboardState` in a class of its own; `page.Dashboard` is all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from health_mlops.registry import Registry
from health_mlops.serving.predictor import Predictor
from health_mlops.serving.sources import DashboardSources, FederationState
from health_mlops.spec import DatasetSpec
from health_mlops.trust.access import Role


class DashboardState:
    """What every tab's callbacks read, and what more than one tab uses: the model reports (Predict's risk context,
    Models), an input beyond the training ranges in words (Predict, Batch)."""

    def __init__(self, spec: DatasetSpec, predictor: Predictor, registry: Registry, sources: DashboardSources,
                 role_of: Callable[[str], Role | None], *, scratch: Path, links: dict[str, str] | None = None,
                 node_links: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.links = links or {}  # the tools beside the dashboard (MLflow's UI, Prometheus), where configured
        self.node_links = node_links or {}  # node id -> its status page, where configured
        self.predictor = predictor
        self.registry = registry
        self.sources = sources
        self.role_of = role_of  # a logged-in user's role, as the accounts file says now
        self.metric = spec.primary_metric
        self._scratch = scratch  # batch results: patient rows, in the dashboard's private folder
        scratch.mkdir(mode=0o700, exist_ok=True)
        self._reports: dict[int, dict[str, Any] | None] = {}

    def _report(self, version: int) -> dict[str, Any] | None:
        if version not in self._reports:  # a version's report never changes: read it once
            self._reports[version] = self.registry.load_report(version)
        return self._reports[version]

    def _beyond(self, flag: dict[str, Any]) -> str:
        """An input beyond what the model was trained on, in words."""
        feature = next(f for f in self.spec.features if f.name == flag["feature"])
        unit = f" {feature.unit}" if feature.unit else ""
        low, high = flag["seen"]
        side = "below" if flag["value"] < low else "above"
        edge = low if side == "below" else high
        return (f"{feature.display_label} {flag['value']:.{feature.display_decimals}f}{unit} is {side} what the model "
                f"was trained on ({low:g} to {high:g}{unit}); it is scored as {edge:g}{unit}")


def source_note(state: FederationState) -> str:
    """Where the Training and Hospitals tabs' look at the federation came from."""
    return f"Source: {state.source}."
