"""The aggregator's HTTP API over real loopback HTTPS with mutual TLS (the service in a thread): who may do what,
how revocation reaches the running service, and how bad requests are answered."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from health_mlops.fl.aggregator import AggregatorService, create_app, create_ops_app
from health_mlops.fl.messages import encode_result
from health_mlops.fl.state import TaskResult
from health_mlops.fl.store import CheckpointStore
from health_mlops.spec import load_spec
from health_mlops.trust.audit import AuditLog, verify_audit
from health_mlops.trust.credentials import ADMIN, FailureThrottle, Gatekeeper, bearer, provision, read_token, token_path
from health_mlops.trust.pki import CA, SERVER, cert_path, key_path
from health_mlops.trust.tls import client_context, server_context
from health_mlops.web.server import BackgroundServer
from tests.conftest import run_cli

pytestmark = pytest.mark.process

SPEC = load_spec("health-risk")
REVOCATION_DEADLINE_S = 5.0  # the acceptance: refused within 5 s of `provision --revoke`, no restart


class Api:
    def __init__(self, url: str, ops_url: str, credentials: Path, audit_log: Path) -> None:
        self.url, self.ops_url, self.credentials, self.audit_log = url, ops_url, credentials, audit_log

    def tls(self, holder: str) -> ssl.SSLContext:
        """A client context presenting `holder`'s certificate."""
        return client_context(cert_path(self.credentials, holder), key_path(self.credentials, holder),
                              cert_path(self.credentials, CA))

    def client(self, who: str | None, node: str = "test-node", *, certificate: str | None = None) -> httpx.Client:
        """`who`'s token (None: no token) over TLS with `certificate`'s holder's certificate (default: `who`'s,
        or hospital-1's for a caller without a token)."""
        headers = {"X-Node-Id": node}
        if who is not None:
            headers.update(bearer(read_token(token_path(self.credentials, who))))
        return httpx.Client(base_url=self.url, headers=headers, timeout=10,
                            verify=self.tls(certificate or who or "hospital-1"))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    credentials = tmp_path / "credentials"
    provision(credentials, ["hospital-1", "hospital-2", "hospital-3"])
    gatekeeper = Gatekeeper(credentials, require_certificate=True)
    tls = server_context(cert_path(credentials, SERVER), key_path(credentials, SERVER),
                         client_ca=cert_path(credentials, CA))
    app = create_app(lambda: AggregatorService(SPEC, CheckpointStore(tmp_path / "models"), gatekeeper,
                                               audit=AuditLog(tmp_path / "audit.log"),
                                               throttle=FailureThrottle(free=20, base_delay_s=0.2)))
    with BackgroundServer(app, tls=tls) as server, BackgroundServer(
            create_ops_app(app, api_listening=lambda: server.started)) as ops:
        yield Api(server.url, ops.url, credentials, tmp_path / "audit.log")


def start_run(api: Api, **body: object) -> dict:
    with api.client(ADMIN) as admin:
        response = admin.post("/v1/runs", json={"config": {"rounds": 2, "min_hospitals": 2}, **body})
    assert response.status_code == 201, response.text
    return response.json()


def test_callers_without_a_known_token_are_refused(api: Api) -> None:
    with api.client(None) as anonymous:
        assert anonymous.get("/v1/runs").status_code == 401
        assert anonymous.get("/v1/tasks/next").status_code == 401
    with httpx.Client(base_url=api.url, headers={"Authorization": "Bearer made-up"},
                      verify=api.tls("hospital-1")) as forger:
        assert forger.get("/v1/runs").status_code == 401


def test_refused_attempts_are_audited_counted_and_the_log_verifies(api: Api) -> None:
    run = start_run(api)
    with api.client("hospital-1") as hospital:
        assert hospital.post(f"/v1/runs/{run['id']}/cancel").status_code == 403
    for authorization in ("Bearer garbage", "", "Basic x"):
        with httpx.Client(base_url=api.url, headers={"Authorization": authorization},
                          verify=api.tls("hospital-2")) as forger:
            assert forger.post(f"/v1/runs/{run['id']}/cancel").status_code == 401
    with api.client("hospital-1", certificate="hospital-2") as mismatched:
        assert mismatched.get("/v1/runs").status_code == 403
    entries = AuditLog(api.audit_log).entries()
    refused = [(e["action"], e["actor"], e["outcome"]) for e in entries if e["outcome"] != "ok"]
    cancel = f"POST /v1/runs/{run['id']}/cancel"
    assert refused == [(cancel, "hospital-1", "refused 403"), *[(cancel, "unknown", "refused 401")] * 3,
                       ("GET /v1/runs", "hospital-1", "refused 403")]
    assert all(e["source"] == "127.0.0.1" for e in entries if e["outcome"] != "ok")
    assert verify_audit(api.audit_log) == (len(entries), None)
    with httpx.Client(base_url=api.ops_url) as ops:
        metrics = ops.get("/metrics").text
    assert 'health_mlops_auth_failures_total{status="401"} 3.0' in metrics
    assert 'health_mlops_auth_failures_total{status="403"} 2.0' in metrics


def test_a_connection_without_a_consortium_client_certificate_fails_in_the_handshake(api: Api,
                                                                                      tmp_path: Path) -> None:
    token = bearer(read_token(token_path(api.credentials, ADMIN)))
    only_ca = ssl.create_default_context(cafile=str(cert_path(api.credentials, CA)))
    with pytest.raises(httpx.TransportError), httpx.Client(base_url=api.url, headers=token, verify=only_ca) as bare:
        bare.get("/v1/runs")
    # A certificate from another CA, however well formed, is no consortium certificate.
    provision(tmp_path / "other-consortium", ["hospital-1"])
    foreign = ssl.create_default_context(cafile=str(cert_path(api.credentials, CA)))
    foreign.load_cert_chain(cert_path(tmp_path / "other-consortium", "hospital-1"),
                            key_path(tmp_path / "other-consortium", "hospital-1"))
    with pytest.raises(httpx.TransportError), httpx.Client(base_url=api.url, headers=token, verify=foreign) as other:
        other.get("/v1/runs")
    with pytest.raises(httpx.TransportError), httpx.Client(base_url=api.url.replace("https", "http")) as plain:
        plain.get("/v1/runs", headers=token)


def test_a_token_is_refused_with_another_holders_certificate(api: Api) -> None:
    with api.client("hospital-1", certificate="hospital-2") as mismatched:
        response = mismatched.get("/v1/whoami")
        assert response.status_code == 403 and "hospital-2" in response.json()["detail"]
    with api.client(ADMIN, certificate="hospital-1") as hospital_as_admin:
        assert hospital_as_admin.get("/v1/runs").status_code == 403
    with api.client("hospital-1") as matched:
        assert matched.get("/v1/whoami").json() == {"role": "hospital", "hospital": "hospital-1"}


def wait_for_status(client: httpx.Client, path: str, status: int) -> float:
    """Seconds until `path` answers `status` (asserting it does within the revocation deadline)."""
    started = time.monotonic()
    while (answer := client.get(path).status_code) != status:
        assert time.monotonic() - started < REVOCATION_DEADLINE_S, f"{path} still answers {answer}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_revocation_and_rotation_reach_the_running_aggregator_without_a_restart(api: Api) -> None:
    home = api.credentials.parent / "cli-home"
    with api.client("hospital-2") as hospital_2:  # its connection, certificate and token, made before the revoke
        assert hospital_2.get("/v1/whoami").status_code == 200
        run_cli("provision", "--out", str(api.credentials), "--revoke", "hospital-2", home=home)
        wait_for_status(hospital_2, "/v1/whoami", 401)  # on the same kept-alive connection
    with api.client(ADMIN) as admin:  # and the run enrols the hospitals that are provisioned now
        response = admin.post("/v1/runs", json={"hospitals": ["hospital-2"]})
        assert response.status_code == 422 and "hospital-2" in response.text
    # Rotation: the new token and certificate work at once; the old token, and the old certificate with the new
    # token, do not.
    old_token = bearer(read_token(token_path(api.credentials, "hospital-1")))
    old_tls = api.tls("hospital-1")
    with httpx.Client(base_url=api.url, headers=old_token, verify=old_tls) as old:
        assert old.get("/v1/whoami").status_code == 200
        run_cli("provision", "--out", str(api.credentials), "--rotate", "hospital-1", home=home)
        wait_for_status(old, "/v1/whoami", 401)
    with api.client("hospital-1") as rotated:
        assert rotated.get("/v1/whoami").json()["hospital"] == "hospital-1"
        new_token = dict(rotated.headers)["authorization"]
    with httpx.Client(base_url=api.url, headers={"Authorization": new_token}, verify=old_tls) as old_certificate:
        response = old_certificate.get("/v1/whoami")
        assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_probes_and_metrics_are_on_the_operations_port_and_not_on_the_api(api: Api) -> None:
    with httpx.Client(base_url=api.ops_url) as ops:  # plain HTTP, no credential: the kubelet and Prometheus
        assert ops.get("/healthz").status_code == 200
        assert ops.get("/readyz").status_code == 200
        assert "health_mlops_runs_active" in ops.get("/metrics").text
        assert ops.get("/v1/runs").status_code == 404
    with api.client("hospital-1") as hospital:  # per-hospital model metrics are not for other hospitals
        assert hospital.get("/metrics").status_code == 404


def test_admin_endpoints_refuse_hospital_tokens_and_hospital_endpoints_refuse_the_admin(api: Api) -> None:
    with api.client("hospital-1") as hospital:
        assert hospital.post("/v1/runs", json={}).status_code == 403
        assert hospital.get("/v1/runs").status_code == 403
    run = start_run(api)
    with api.client("hospital-1") as hospital:
        assert hospital.post(f"/v1/runs/{run['id']}/cancel").status_code == 403
    with api.client(ADMIN) as admin:
        assert admin.get("/v1/tasks/next").status_code == 403


def test_a_hospital_gets_only_its_own_task_and_cannot_answer_for_another(api: Api) -> None:
    run = start_run(api, hospitals=["hospital-1", "hospital-2"])
    with api.client("hospital-1") as first, api.client("hospital-2") as second, api.client("hospital-3") as third:
        task = first.get("/v1/tasks/next").json()
        assert task["id"].endswith("hospital-1") and task["kind"] == "stats" and task["round"] == 0
        assert second.post(f"/v1/tasks/{task['id']}/heartbeat").status_code == 403
        assert second.post(f"/v1/tasks/{task['id']}/result", content=b"").status_code == 403
        assert third.get("/v1/tasks/next").status_code == 204  # not enrolled: nothing to do
        assert third.get(f"/v1/runs/{run['id']}/rounds/0/weights").status_code == 403
        assert first.post(f"/v1/tasks/{task['id']}/heartbeat").status_code == 200
    with api.client("hospital-1", node="another-replica") as replica:
        assert replica.post(f"/v1/tasks/{task['id']}/heartbeat").status_code == 409  # lease held by test-node
    refused = [(e["actor"], e["action"].split(" ")[0], e["outcome"]) for e in AuditLog(api.audit_log).entries()
               if e["outcome"] != "ok"]
    assert refused == [("hospital-2", "POST", "refused 403")] * 2 + [("hospital-3", "GET", "refused 403")]


def test_invalid_run_requests_are_refused_naming_the_field(api: Api) -> None:
    with api.client(ADMIN) as admin:
        response = admin.post("/v1/runs", json={"config": {"rounds": 0}})
        assert response.status_code == 422 and "rounds" in response.text
        response = admin.post("/v1/runs", json={"config": {"strategy": {"name": "fedmagic"}}})
        assert response.status_code == 422 and "name" in response.text
        response = admin.post("/v1/runs", json={"hospitals": ["hospital-9"]})
        assert response.status_code == 422 and "hospital-9" in response.text
        response = admin.post("/v1/runs", json={"config": {"min_hospitals": 4}})
        assert response.status_code == 422 and "min_hospitals" in response.text
        response = admin.post("/v1/runs", content=b'{"config": {"lease_s": 1e400}}',
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "lease_s" in response.text
        response = admin.post("/v1/runs", json={"config": {"lease_s": 30, "round_deadline_s": 20}})
        assert response.status_code == 422 and "round_deadline_s" in response.text
        response = admin.post("/v1/runs", json={"hospitals": ["hospital-1", "hospital-1"]})
        assert response.status_code == 422 and "once" in response.text
        assert admin.get("/v1/runs/no-such-run").status_code == 404


def test_a_cancelled_run_hands_out_no_more_tasks(api: Api) -> None:
    run = start_run(api)
    with api.client(ADMIN) as admin:
        cancelled = admin.post(f"/v1/runs/{run['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    with api.client("hospital-1") as hospital:
        assert hospital.get("/v1/tasks/next").status_code == 204


def test_an_oversized_or_unreadable_result_is_refused_and_the_task_stays_open(api: Api) -> None:
    start_run(api)
    with api.client("hospital-1") as hospital:
        task = hospital.get("/v1/tasks/next").json()
        too_big = hospital.post(f"/v1/tasks/{task['id']}/result", content=b"x" * (64 * 1024 * 1024 + 1))
        assert too_big.status_code == 413
        garbage = hospital.post(f"/v1/tasks/{task['id']}/result", content=b"garbage")
        assert garbage.status_code == 422 and garbage.json()["reason"] == "unreadable"
        assert hospital.post(f"/v1/tasks/{task['id']}/heartbeat").status_code == 200  # still ours to answer


def test_a_result_computed_for_another_task_is_refused(api: Api) -> None:
    """A result is bound to its task: one naming another task (an update replayed for the hospital's next round)
    gets 422 before its metadata is looked at."""
    start_run(api)
    with api.client("hospital-1") as hospital:
        task = hospital.get("/v1/tasks/next").json()
        assert ".r0." in task["id"]  # round 0's task; the replay names round 1's
        replayed = encode_result(TaskResult({"count": 10}), task["id"].replace(".r0.", ".r1."))
        response = hospital.post(f"/v1/tasks/{task['id']}/result", content=replayed)
        assert response.status_code == 422 and "names task" in response.json()["detail"], response.text


def test_malformed_stats_are_refused_and_the_aggregator_keeps_answering(api: Api) -> None:
    run = start_run(api)
    with api.client("hospital-1") as hospital:
        task = hospital.get("/v1/tasks/next").json()
        body = encode_result(TaskResult({"count": "many", "sums": [], "sums_of_squares": [], "target_sum": 0,
                                         "target_sum_of_squares": 0}), task["id"])
        response = hospital.post(f"/v1/tasks/{task['id']}/result", content=body)
        assert response.status_code == 422 and response.json()["reason"] == "bad_metadata"
        assert "count" in response.json()["detail"]
        assert hospital.get("/v1/whoami").json() == {"role": "hospital", "hospital": "hospital-1"}
    with api.client(ADMIN) as admin:
        view = admin.get(f"/v1/runs/{run['id']}").json()
        assert view["rejected"] == {"bad_metadata": 1}
        admin.post(f"/v1/runs/{run['id']}/cancel")
    actions = [e["action"] for e in AuditLog(api.audit_log).entries()]
    assert actions == ["start_run", "run_ended", "cancel_run"]


def test_start_run_command_asks_the_aggregator_with_the_configured_parameters(api: Api, tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    env = {**os.environ, "HEALTH_MLOPS_HOME": str(home), "HEALTH_MLOPS_AGGREGATOR_URL": api.url,
           "HEALTH_MLOPS_CREDENTIALS_DIR": str(api.credentials), "HEALTH_MLOPS_FL_ROUNDS": "7",
           "HEALTH_MLOPS_FL_STRATEGY": "fedprox", "COLUMNS": "160"}
    command = [sys.executable, "-m", "health_mlops.cli", "start-run", "--json"]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    assert run["config"]["rounds"] == 7 and run["config"]["strategy"]["name"] == "fedprox"
    assert run["hospitals"] == ["hospital-1", "hospital-2", "hospital-3"]
    assert '"action": "start_run"' in api.audit_log.read_text()
    chosen = subprocess.run([*command, "--rounds", "3", "--hospital", "hospital-2", "--hospital", "hospital-3"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(chosen.stdout)["hospitals"] == ["hospital-2", "hospital-3"]
    refused = subprocess.run([*command, "--hospital", "hospital-9"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "the aggregator refused the run (4" in refused.stderr, refused.stderr
    assert "hospital-9" in refused.stderr
    secure = [*command, "--secure-aggregation", "--secure-colluding-hospitals"]
    tolerant = subprocess.run([*secure, "1"], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(tolerant.stdout)["config"]["secure_colluding_hospitals"] == 1, tolerant.stderr
    outvoted = subprocess.run([*secure, "3"], env=env, capture_output=True, text=True, timeout=120)
    assert outvoted.returncode == 1 and "secure_colluding_hospitals: 3 colluding of 3 enrolled hospitals needs 4" in (
        outvoted.stderr), outvoted.stderr
    plain = subprocess.run([*command, "--secure-colluding-hospitals", "1"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert plain.returncode == 2 and "--secure-colluding-hospitals needs --secure-aggregation" in plain.stderr
    no_token = subprocess.run(command, env={**env, "HEALTH_MLOPS_CREDENTIALS_DIR": str(tmp_path / "none")},
                              capture_output=True, text=True, timeout=120)
    assert no_token.returncode == 2 and "no admin token" in no_token.stderr
    bad = subprocess.run(command, env={**env, "HEALTH_MLOPS_FL_STRATEGY": "fedmagic"}, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "HEALTH_MLOPS_FL_STRATEGY" in bad.stderr and "fedmagic" in bad.stderr
    away = subprocess.run(command, env={**env, "HEALTH_MLOPS_AGGREGATOR_URL": "https://127.0.0.1:9"},
                          capture_output=True, text=True, timeout=120)
    assert away.returncode == 1 and "cannot reach the aggregator at https://127.0.0.1:9" in away.stderr
