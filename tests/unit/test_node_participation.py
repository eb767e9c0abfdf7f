"""A hospital's own terms, applied by its node before it asks the aggregator for anything: with
REQUIRE_SECURE_AGGREGATION, the fit task of a plain run is refused and nothing is downloaded, computed or sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from health_mlops.data.hospital import load_hospital
from health_mlops.data.synthetic import generate_dataset
from health_mlops.fl.messages import TaskMessage
from health_mlops.fl.node import HospitalNode
from health_mlops.fl.run_config import RunConfig
from health_mlops.fl.secure_fit import ParticipationPolicy
from health_mlops.fl.state import TaskKind
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import ClientCredential
from health_mlops.trust.pki import CA, cert_path, ensure_certificates, key_path

SPEC = load_spec("health-risk")


class NoRequests:
    """Stands in for the node's client: any use of it is a request the test did not expect."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the node used its client ({name}) for a task it must refuse")


@pytest.fixture
def node(tmp_path: Path) -> HospitalNode:
    generate_dataset(tmp_path / "data", n_hospitals=1, rows_per_hospital=200, seed=1, split_seed=1,
                     test_fraction=0.2)
    ensure_certificates(tmp_path / "pki", ["hospital-1"])
    credential = ClientCredential("hospital-1", "token", cert_path(tmp_path / "pki", "hospital-1"),
                                  key_path(tmp_path / "pki", "hospital-1"), cert_path(tmp_path / "pki", CA))
    node = HospitalNode(data=load_hospital(tmp_path / "data" / "hospital-1", SPEC), spec=SPEC, node_id="hospital-1-a",
                        city="", central_url="https://127.0.0.1:9", credential=credential, split_seed=1,
                        test_fraction=0.2, policy=ParticipationPolicy(require_secure_aggregation=True))
    node._client = NoRequests()  # type: ignore[assignment]
    return node


def test_a_node_requiring_secure_aggregation_refuses_a_plain_fit_before_any_request(node: HospitalNode) -> None:
    task = TaskMessage(id="run-1.r1.a0.hospital-1", run_id="run-1", round=1, attempt=0, kind=TaskKind.fit,
                       config=RunConfig(), preprocessing=None, weights_path="/v1/runs/run-1/rounds/1/weights",
                       lease_expires=0.0, lease_s=15.0)
    assert node.work(task) == "refused"
    assert node.status.outcomes == {"refused": 1} and node.status.last_task["outcome"] == "refused"
    assert node.status.transmissions.view()["requests"] == 0
