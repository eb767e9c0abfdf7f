"""The Hospitals tab: each hospital of the federation, its status, replicas (linked to their status pages), last
heartbeat, rows, metric, suppressed cells and privacy spent."""

from __future__ import annotations

import time
from typing import Literal

import pandas as pd

from health_mlops.serving.sources import FederationState
from health_mlops.serving.ui.shared import DashboardState, source_note


# The Hospitals table's ten columns (see `HospitalsTab.hospitals`): the third, a hospital's replicas, links each to its
# node's status page.
HOSPITAL_COLUMN_TYPES: list[Literal["str", "markdown"]] = ["str", "str", "markdown", "str", "str", "str", "str", "str",
                                                          "str", "str"]


class HospitalsTab(DashboardState):
    """The Hospitals tab's view of one look at the federation (`Dashboard.federation` takes the look)."""

    def hospitals(self, state: FederationState) -> tuple[str, pd.DataFrame]:
        now = time.time()
        table = pd.DataFrame([{"hospital": h.hospital, "status": h.status, "replicas": self._replicas(h.replicas),
                               "last heartbeat": None if h.last_heartbeat is None else
                               f"{max(now - h.last_heartbeat, 0):.0f} s ago",
                               "rows trained on": h.rows,
                               "rows quarantined": h.rows_quarantined, "last round": h.last_round,
                               self.metric: None if h.metric is None else round(h.metric, 4),
                               "small cells suppressed": _suppressed(h.suppressed),
                               "privacy ε spent": None if h.epsilon is None else round(h.epsilon, 3)}
                              for h in state.hospitals],
                             columns=["hospital", "status", "replicas", "last heartbeat", "rows trained on",
                                      "rows quarantined", "last round",
                                      self.metric, "small cells suppressed", "privacy ε spent"])
        return source_note(state), table

    def _replicas(self, replicas: list[str]) -> str:
        """A hospital's replicas, each a link to its status page where one is configured (Markdown)."""
        return ", ".join(f"[{r}]({self.node_links[r]})" if r in self.node_links else r for r in replicas)


def _suppressed(cells: dict[str, int] | None) -> str | None:
    if cells is None:
        return None
    return f"{cells.get('categories', 0)} categories, {cells.get('histogram_bins', 0)} histogram bins"
