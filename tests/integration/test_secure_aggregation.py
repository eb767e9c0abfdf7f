"""Secure aggregation with the real services: the loopback federation (`train --mode federated`, mutual TLS)
trains the same model with and without it, and a federation of processes survives a hospital's node dying in the
middle of a secure round."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import run_cli_json
from tests.integration.test_federation_processes import Cluster, start_standard_nodes


def test_the_secure_federation_trains_the_plain_federations_model(data: Path, tmp_path: Path) -> None:
    options = ["train", "--data", str(data), "--mode", "federated", "--rounds", "2"]
    plain = run_cli_json(*options, home=tmp_path / "plain")
    secure = run_cli_json(*options, "--secure-aggregation", home=tmp_path / "secure")
    assert (plain["run"]["config"]["secure_aggregation"], secure["run"]["config"]["secure_aggregation"]) == (False,
                                                                                                            True)
    # The same updates summed in fixed point (2^-24) instead of float: the same model to float32's precision.
    for metric in ("auc", "brier", "log_loss"):
        assert secure["mean_over_hospitals"][metric] == pytest.approx(plain["mean_over_hospitals"][metric], abs=1e-5)


@pytest.fixture
def cluster(tmp_path: Path, data: Path) -> Cluster:
    cluster = Cluster(tmp_path / "home", data)
    yield cluster
    cluster.admin.close()
    cluster.processes.stop_all()


def test_a_node_dying_in_a_secure_round_leaves_the_others_to_finish_the_run(cluster: Cluster) -> None:
    cluster.start_aggregator()
    start_standard_nodes(cluster)  # hospital-1 has two replicas: a secure round's steps are one replica's
    # A dead hospital holds each later phase up to its deadline; the heartbeats keep the living ones' leases.
    run_id = cluster.start_run(secure_aggregation=True, min_hospitals=2, rounds=3, lease_s=10, round_deadline_s=20,
                               secure_phase_s=8)
    cluster.wait_for(run_id, lambda v: v.round >= 2, timeout_s=300)
    cluster.nodes["hospital-3-a"].process.send_signal(signal.SIGKILL)  # mid-round, in whichever phase
    final = cluster.wait_for(run_id, lambda v: v.status != "running", timeout_s=600)
    assert final.status == "completed", final.reason
    fits = [r for r in final.history if r.kind.value == "fit"]
    assert all(r.secure_aggregation is not None and r.secure_aggregation["threshold"] == 2 for r in fits)
    first = fits[0].secure_aggregation
    assert first is not None and "hospital-3" in first["masked"]  # alive in round 1
    after = fits[-1].secure_aggregation
    assert after is not None and after["masked"] == ["hospital-1", "hospital-2"]  # hospital-3 is gone
    assert "hospital-3" not in fits[-1].hospitals
    assert final.history[-1].global_metrics["auc"] > 0.6
    log = cluster.aggregator.log_path.read_text(encoding="utf-8")
    assert " ERROR " not in log and "Traceback" not in log
