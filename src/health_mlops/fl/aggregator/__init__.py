"""The aggregator: the coordinator behind DESIGN.md's `/v1` HTTP API.

- `service`: the coordinator with persistence (checkpoints, result files, compaction), wake-ups for waiting
  nodes and model registration; no HTTP.
- `reporting`: metrics, log lines and audit entries, from the coordinator's events.
- `dependencies`: who a caller is (token and client certificate together) and the role an endpoint needs.
- `routes`: the API, and the coordinator's refusals as HTTP answers (exception handlers).
- `server`: the operations port (probes, metrics) and `serve`.

The API is served over mutual TLS (`security.Gatekeeper`); probes and metrics are on a separate plain-HTTP
operations port.
"""

from health_mlops.fl.aggregator.routes import create_app
from health_mlops.fl.aggregator.server import create_ops_app, serve
from health_mlops.fl.aggregator.service import AggregatorService, restore_coordinator

__all__ = ["AggregatorService", "create_app", "create_ops_app", "restore_coordinator", "serve"]
