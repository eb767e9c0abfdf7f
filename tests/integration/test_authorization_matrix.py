"""Who may call what, as one table: every endpoint of the aggregator (its API over mutual TLS and its operations
port) against every kind of caller, over real loopback HTTPS. An endpoint without a row fails the test, so a new
route cannot ship without deciding who may call it."""

from __future__ import annotations

import secrets
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from health_mlops.fl.aggregator import AggregatorService, create_app, create_ops_app
from health_mlops.fl.store import CheckpointStore
from health_mlops.spec import load_spec
from health_mlops.trust.credentials import (ADMIN, FailureThrottle, Gatekeeper, bearer, provision, read_token,
                                            revoke_token, token_path)
from health_mlops.trust.pki import CA, SERVER, cert_path, key_path
from health_mlops.trust.pki import revoke as revoke_certificate
from health_mlops.trust.tls import client_context, server_context
from health_mlops.web.server import BackgroundServer

# One consortium for the module (`consortium`): its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("authorization-matrix")

SPEC = load_spec("health-risk")
# Callers, in the order each row's requests are made.
CALLERS = ("no credential", "unknown token", "revoked", "hospital-3 (not in the run)",
           "hospital-2 (on hospital-1's task)", "hospital-1", "admin")
RUN_CONFIG = {"rounds": 2, "min_hospitals": 2, "lease_s": 600, "round_deadline_s": 1200}


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # the route's template; {run}, {cancel_run} and {task} are filled in below
    expected: dict[str, int]  # caller -> status
    body: bytes | None = None


def everyone(status: int) -> dict[str, int]:
    return dict.fromkeys(CALLERS, status)


def refused_unless(allowed: dict[str, int], *, others: int = 403) -> dict[str, int]:
    """401 without a valid credential, `others` for valid credentials not in `allowed`."""
    return {caller: allowed.get(caller, 401 if caller in ("no credential", "unknown token", "revoked") else others)
            for caller in CALLERS}


RUN_BODY = b'{"hospitals": ["hospital-1", "hospital-2"], "config": {"rounds": 1, "min_hospitals": 2}}'
API = [
    Row("GET", "/openapi.json", everyone(200)),  # the protocol is no secret; reaching it takes a certificate
    Row("GET", "/docs", everyone(200)),
    Row("GET", "/docs/oauth2-redirect", everyone(200)),
    Row("GET", "/static-offline-docs/{file}", everyone(200)),  # /docs' Swagger UI, served here: no CDN
    Row("POST", "/v1/runs", refused_unless({"admin": 201}), RUN_BODY),
    Row("GET", "/v1/runs", refused_unless({"admin": 200})),
    Row("GET", "/v1/runs/{run_id}", refused_unless({"admin": 200})),
    Row("POST", "/v1/runs/{run_id}/cancel", refused_unless({"admin": 200})),
    Row("GET", "/v1/whoami", refused_unless({c: 200 for c in CALLERS[3:]})),
    # The admin has no tasks; hospital-3 is not enrolled (nothing to do); hospital-2 gets its own task.
    Row("GET", "/v1/tasks/next", refused_unless({"hospital-3 (not in the run)": 204,
                                                 "hospital-2 (on hospital-1's task)": 200, "hospital-1": 200})),
    Row("GET", "/v1/runs/{run_id}/rounds/{round_number}/weights",
        refused_unless({"hospital-2 (on hospital-1's task)": 200, "hospital-1": 200, "admin": 200})),
    Row("POST", "/v1/tasks/{task_id}/heartbeat", refused_unless({"hospital-1": 200})),
    # hospital-1's own body is unreadable: 422 shows the request got past authorization.
    Row("POST", "/v1/tasks/{task_id}/result", refused_unless({"hospital-1": 422}), b"not safetensors"),
    # Secure aggregation's steps, the task's holder's only: hospital-1's task is not a secure round's (409 shows the
    # request got past authorization).
    Row("GET", "/v1/tasks/{task_id}/secure", refused_unless({"hospital-1": 409})),
    Row("POST", "/v1/tasks/{task_id}/secure/keys", refused_unless({"hospital-1": 409}),
        b'{"c_public": "' + b"A" * 43 + b'=", "s_public": "' + b"A" * 43 + b'=", "signature": "AA==", '
        b'"certificate": "-----BEGIN CERTIFICATE-----"}'),
    Row("POST", "/v1/tasks/{task_id}/secure/shares", refused_unless({"hospital-1": 409}), b'{"shares": []}'),
    Row("POST", "/v1/tasks/{task_id}/secure/consistency", refused_unless({"hospital-1": 409}),
        b'{"signature": "AA=="}'),
    Row("POST", "/v1/tasks/{task_id}/secure/refuse", refused_unless({"hospital-1": 409}), b'{"reason": "a test"}'),
    Row("POST", "/v1/tasks/{task_id}/secure/reveal", refused_unless({"hospital-1": 409}),
        b'{"self_seed_shares": {}, "s_key_shares": {}}'),
]
OPERATIONS = [  # plain HTTP, no credential: reachable by the kubelet and Prometheus only (NetworkPolicies)
    Row("GET", "/healthz", everyone(200)),
    Row("GET", "/readyz", everyone(200)),
    Row("GET", "/metrics", everyone(200)),
]


def routes(app: FastAPI) -> set[tuple[str, str]]:
    files = {("GET", f"{route.path}/{{file}}") for route in app.routes
             if isinstance(route, Mount) and isinstance(route.app, StaticFiles)}
    return files | {(method, route.path) for route in app.routes for method in getattr(route, "methods", ())
                    if method != "HEAD"}


class Consortium:
    """The aggregator over mutual TLS with a run of hospital-1 and hospital-2, and a client per caller."""

    def __init__(self, api_url: str, ops_url: str, credentials: Path, revoked: Path) -> None:
        self.api_url, self.ops_url, self.credentials = api_url, ops_url, credentials
        ca = cert_path(credentials, CA)

        def tls(folder: Path, holder: str) -> ssl.SSLContext:
            return client_context(cert_path(folder, holder), key_path(folder, holder), ca)

        def token(holder: str) -> dict[str, str]:
            return bearer(read_token(token_path(credentials, holder)))

        hospital_1_tls = tls(credentials, "hospital-1")
        def client(**settings: Any) -> httpx.Client:
            # httpx's default 5 s read timeout is a speed assumption: on 2 busy CPUs a 1.5 MB file of the offline docs
            # took longer. The matrix is about who gets which answer, not how fast.
            return httpx.Client(timeout=60.0, **settings)

        self.clients = {
            "no credential": client(verify=hospital_1_tls),
            "unknown token": client(verify=hospital_1_tls, headers=bearer(secrets.token_urlsafe(32))),
            "revoked": client(verify=tls(revoked, "hospital-4"),
                                    headers=bearer(read_token(token_path(revoked, "hospital-4")))),
            "hospital-3 (not in the run)": client(verify=tls(credentials, "hospital-3"),
                                                        headers=token("hospital-3")),
            "hospital-2 (on hospital-1's task)": client(verify=tls(credentials, "hospital-2"),
                                                              headers=token("hospital-2")),
            "hospital-1": client(verify=hospital_1_tls, headers=token("hospital-1")),
            "admin": client(verify=tls(credentials, ADMIN), headers=token(ADMIN)),
        }
        admin = self.clients["admin"]
        run = admin.post(f"{api_url}/v1/runs", json={"hospitals": ["hospital-1", "hospital-2"], "config": RUN_CONFIG})
        self.run_id = run.raise_for_status().json()["id"]
        hospital_1_task = self.clients["hospital-1"].get(f"{api_url}/v1/tasks/next").raise_for_status().json()
        self.task_id = hospital_1_task["id"]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    root = tmp_path_factory.mktemp("matrix")
    credentials = root / "credentials"
    provision(credentials, ["hospital-1", "hospital-2", "hospital-3", "hospital-4"])
    revoked = root / "revoked"  # hospital-4's credential as it was, then revoked
    revoked.mkdir()
    for name in ("hospital-4.token", "hospital-4.crt", "hospital-4.key"):
        shutil.copy(credentials / name, revoked / name)
    revoke_token(credentials, "hospital-4")
    revoke_certificate(credentials, "hospital-4")
    tls = server_context(cert_path(credentials, SERVER), key_path(credentials, SERVER),
                         client_ca=cert_path(credentials, CA))
    app = create_app(lambda: AggregatorService(SPEC, CheckpointStore(root / "models"),
                                               Gatekeeper(credentials, require_certificate=True),
                                               throttle=FailureThrottle(free=10_000)))  # every caller is loopback
    with BackgroundServer(app, tls=tls) as api, BackgroundServer(
            create_ops_app(app, api_listening=lambda: api.started)) as ops:
        consortium = Consortium(api.url, ops.url, credentials, revoked)
        yield consortium
        consortium.close()


def test_every_endpoint_has_a_row_for_every_caller() -> None:
    app = create_app(lambda: None)  # type: ignore[arg-type,return-value]
    assert routes(app) == {(r.method, r.path) for r in API}
    assert routes(create_ops_app(app, api_listening=lambda: True)) == {(r.method, r.path) for r in OPERATIONS}
    assert all(set(r.expected) == set(CALLERS) for r in [*API, *OPERATIONS])


@pytest.mark.parametrize("row", API, ids=lambda r: f"{r.method} {r.path}")
def test_the_api_answers_each_caller_as_the_table_says(consortium: Consortium, row: Row) -> None:
    cancel_run = None
    if row.path == "/v1/runs/{run_id}/cancel" and "admin" in row.expected:  # a run of its own to cancel
        cancel_run = consortium.clients["admin"].post(f"{consortium.api_url}/v1/runs", content=RUN_BODY,
                                                      headers={"Content-Type": "application/json"}).json()["id"]
    path = (row.path.replace("{run_id}", cancel_run or consortium.run_id).replace("{round_number}", "0")
            .replace("{task_id}", consortium.task_id).replace("{file}", "swagger-ui-bundle.js"))
    answered = {}
    for caller in CALLERS:
        headers = {"Content-Type": "application/json"} if row.body is not None else {}
        response = consortium.clients[caller].request(row.method, consortium.api_url + path, content=row.body,
                                                      headers=headers)
        answered[caller] = response.status_code
    assert answered == row.expected


@pytest.mark.parametrize("row", OPERATIONS, ids=lambda r: f"{r.method} {r.path}")
def test_the_operations_port_answers_everyone(consortium: Consortium, row: Row) -> None:
    answered = {caller: httpx.request(row.method, consortium.ops_url + row.path,
                                      headers=consortium.clients[caller].headers).status_code for caller in CALLERS}
    assert answered == row.expected
