"""The aggregator killed (SIGKILL) at each step where a crash could lose or repeat work, then restarted: the run
completes, its final model equals the undisturbed run's, and exactly one model version is registered for it.

The aggregator kills itself at a named crash point (`HEALTH_MLOPS_CRASH_AT`, system/faults.py), so the crash lands at
the same step however fast the machine is. Nodes are real processes with heartbeats and are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from health_mlops.fl.messages import RunView, decode_weights
from health_mlops.fl.strategies import Weights
from tests.conftest import made_once, run_cli_json
from tests.integration.test_federation_processes import HOSPITALS, Cluster

pytestmark = pytest.mark.process

# A round deadline far beyond the test: a round may close only because every hospital answered, never because
# time ran out (a restored round whose closing was lost must close at once).
RUN = {"rounds": 3, "local_epochs": 1, "min_hospitals": 3, "lease_s": 10, "round_deadline_s": 3600, "seed": 5}
DEATH_TIMEOUT_S = 300  # generous: the wait ends as soon as the aggregator dies


@contextmanager
def federation(home: Path, data: Path, empty_mlflow_db: Path, crash_at: str | None) -> Iterator[Cluster]:
    cluster = Cluster(home, data, empty_mlflow_db)
    try:
        cluster.start_aggregator(crash_at=crash_at)
        for hospital in HOSPITALS:
            cluster.start_node(hospital, f"{hospital}-a")
        yield cluster
    finally:
        cluster.admin.close()
        cluster.processes.stop_all()


def registered(cluster: Cluster, run_id: str) -> tuple[RunView, Weights]:
    """The completed run once its model's registration is recorded, and its final weights."""
    view = cluster.wait_for(run_id, lambda v: v.status != "running", timeout_s=300)
    assert view.status == "completed", view.reason
    view = cluster.wait_for(run_id, lambda v: (v.model or {}).get("status") not in (None, "registering"))
    body = cluster.admin.get(f"/v1/runs/{run_id}/rounds/{view.final_round}/weights").raise_for_status().content
    return view, decode_weights(body)[0]


@pytest.fixture(scope="session")
def undisturbed(tmp_path_factory: pytest.TempPathFactory, data: Path, empty_mlflow_db: Path) -> Weights:
    """The final weights of the run no crash disturbed, trained once for every crash point (whichever worker)."""
    def train(folder: Path) -> None:
        with federation(folder / "home", data, empty_mlflow_db, None) as cluster:
            save_file(registered(cluster, cluster.start_run(**RUN))[1], str(folder / "weights.safetensors"))

    return load_file(str(made_once(tmp_path_factory, "undisturbed-run", train) / "weights.safetensors"))


@pytest.mark.parametrize("crash_at", [
    "result_accepted:5",  # round 1's second fit result: durable, its hospital never answered
    "checkpoint_unrenamed:4",  # a state written to its temporary file, the old one still in place
    "round_closed_weights_unwritten:3",  # round 1 closed in memory, round 2's weights and the state unwritten
    "model_registered_unrecorded:1",  # the model is in MLflow, the aggregator has not recorded it
])
def test_a_crash_at_each_step_loses_nothing_and_repeats_nothing(crash_at: str, tmp_path: Path, data: Path,
                                                                empty_mlflow_db: Path, undisturbed: Weights) -> None:
    with federation(tmp_path / "home", data, empty_mlflow_db, crash_at) as cluster:
        run_id = cluster.start_run(**RUN)
        deadline = time.monotonic() + DEATH_TIMEOUT_S
        while cluster.aggregator.process.poll() is None:
            assert time.monotonic() < deadline, f"the aggregator never reached {crash_at}"
            time.sleep(0.1)
        assert cluster.aggregator.process.returncode == -9, cluster.aggregator.log_tail()
        cluster.start_aggregator()  # the same models directory, no crash point
        view, weights = registered(cluster, run_id)
        assert [r.round for r in view.history] == list(range(view.final_round + 1))  # no round lost or repeated
        assert view.model is not None and view.model["status"] == "registered", view.model
        for name, tensor in undisturbed.items():  # the same model (float sums may differ in their last bits)
            np.testing.assert_allclose(weights[name], tensor, rtol=1e-5, atol=1e-6)
        versions = run_cli_json("registry", "list", home=cluster.home)
        assert [(v["version"], v["federation_run"]) for v in versions] == [(1, run_id)]
        assert not list((cluster.home / "models" / "runs" / run_id / "results").glob("*.safetensors"))
