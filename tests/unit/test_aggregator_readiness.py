"""The aggregator is ready only once a client can connect to its API, not as soon as its checkpoint is loaded."""

from __future__ import annotations

from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient

from health_mlops.fl.aggregator import create_ops_app


def test_ready_waits_for_the_api_to_accept_connections() -> None:
    api = FastAPI()
    listening = False
    with TestClient(create_ops_app(api, api_listening=lambda: listening)) as ops:  # type: ignore[arg-type]
        assert ops.get("/readyz").status_code == 503  # the checkpoint not yet loaded
        api.state.service = SimpleNamespace()
        api.state.ticker = SimpleNamespace(done=lambda: False)
        refused = ops.get("/readyz")  # loaded (uvicorn's startup ran), the API socket not yet open
        assert refused.status_code == 503 and "not yet accepting connections" in refused.text
        listening = True
        assert ops.get("/readyz").status_code == 200
