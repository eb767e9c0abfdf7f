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
        private = bool(state.runs and state.runs[-1].privacy)
        table = pd.DataFrame([{"hospital": h.hospital, "status": h.status, "replicas": self._replicas(h.replicas),
                               "last heartbeat": "no task open" if h.last_heartbeat is None else
                               f"{max(now - h.last_heartbeat, 0):.0f} s ago",
                               "rows trained on": h.rows,
                               "rows quarantined": h.rows_quarantined, "last round": h.last_round,
                               self.metric: None if h.metric is None else round(h.metric, 4),
                               "kept at the hospital (under 5 patients)": _suppressed(h.suppressed),
                               "privacy ε spent": round(h.epsilon, 3) if h.epsilon is not None else
                               "none yet" if private else "no differential privacy"}
                              for h in state.hospitals],
                             columns=["hospital", "status", "replicas", "last heartbeat", "rows trained on",
                                      "rows quarantined", "last round",
                                      self.metric, "kept at the hospital (under 5 patients)", "privacy ε spent"])
        return source_note(state), table

    def _replicas(self, replicas: list[str]) -> str:
        """A hospital's replicas, each a link to its status page where one is configured (Markdown)."""
        return ", ".join(f"[{r}]({self.node_links[r]})" if r in self.node_links else r for r in replicas)


def _suppressed(cells: dict[str, int] | None) -> str | None:
    """What round 0's statistics withheld as describing fewer than 5 patients, in words: a category (a rare smoking
    status, say) or a range of a feature's values (a histogram bin of ages over 100)."""
    if cells is None:
        return None
    categories, ranges = cells.get("categories", 0), cells.get("histogram_bins", 0)
    if not categories and not ranges:
        return "nothing"
    return f"{categories} categories and {ranges} value ranges of a feature"
