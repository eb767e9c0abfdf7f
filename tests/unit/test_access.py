"""Accounts, sessions and the dashboard's session gate, in process with a clock the test moves."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from health_mlops.errors import CredentialError
from health_mlops.monitoring import ServingMetrics
from health_mlops.serving.access_edge import (SESSION_COOKIE, USER_SCOPE_KEY, FunctionRule, SessionGate,
                                              UploadQuota)
from health_mlops.trust.access import Accounts, SessionStore, issue_key, remove_user, revoke_key, set_user
from health_mlops.trust.audit import AuditLog
from health_mlops.trust.credentials import FailureThrottle
from health_mlops.web.edge import Receive, Scope, Send

PASSWORD = "a long enough passphrase"
IDLE_S = 900.0
UPLOAD_QUOTA = 1000  # bytes an hour, per user


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def echo_user(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the gate: answers who the gate let in."""
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"user": scope.get(USER_SCOPE_KEY)}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    path = tmp_path / "credentials" / "dashboard-accounts.json"
    set_user(path, "cleo", "clinician", PASSWORD)
    set_user(path, "ada", "admin", PASSWORD)
    return path


@pytest.fixture
def gate(accounts: Path, tmp_path: Path) -> tuple[TestClient, Clock, Path]:
    clock = Clock()
    rules = {0: FunctionRule("clinician", user_action=True), 1: FunctionRule("admin", user_action=True),
             2: FunctionRule("clinician", user_action=False)}
    app = SessionGate(echo_user, accounts=lambda: Accounts.load(accounts), sessions=SessionStore(IDLE_S, clock=clock),
                      function_rules=lambda: rules, audit=AuditLog(tmp_path / "audit.log"), metrics=ServingMetrics(),
                      secure_cookie=True, throttle=FailureThrottle(max_delay_s=0.0),
                      uploads=UploadQuota(UPLOAD_QUOTA, clock=clock))
    return TestClient(app, base_url="https://dashboard"), clock, accounts


def log_in(client: TestClient, user: str) -> None:
    answer = client.post("/login", data={"username": user, "password": PASSWORD}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    assert all(flag in cookie for flag in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/"))


def event(client: TestClient, fn_index: int) -> int:
    body = {"data": [], "fn_index": fn_index, "session_hash": "s"}
    return client.post("/gradio_api/queue/join", json=body).status_code


def test_passwords_are_kept_as_argon2id_hashes_in_a_private_file(accounts: Path) -> None:
    raw = accounts.read_text()
    assert PASSWORD not in raw
    assert json.loads(raw)["users"]["cleo"]["password_hash"].startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert stat.S_IMODE(accounts.stat().st_mode) == 0o600
    loaded = Accounts.load(accounts)
    assert loaded.check_password("cleo", PASSWORD) == "clinician"
    assert loaded.check_password("cleo", PASSWORD + " ") is None
    assert loaded.check_password("nobody", PASSWORD) is None


def test_accounts_refuse_short_passwords_bad_names_and_a_file_they_cannot_read(accounts: Path) -> None:
    with pytest.raises(CredentialError, match="at least 12 characters"):
        set_user(accounts, "otto", "operator", "short")
    with pytest.raises(CredentialError, match="account name"):
        set_user(accounts, "../otto", "operator", PASSWORD)
    accounts.write_text('{"users": {"eve": {"role": "root", "password_hash": "$argon2id$x"}}}')
    with pytest.raises(CredentialError, match="user 'eve' has no valid role"):
        Accounts.load(accounts)
    accounts.write_text("{not json")
    with pytest.raises(CredentialError, match="not a readable accounts file"):
        set_user(accounts, "otto", "operator", PASSWORD)
    assert accounts.read_text() == "{not json"  # a file it cannot read is left as it was, not overwritten
    with pytest.raises(CredentialError, match="no dashboard accounts"):
        Accounts.load(accounts.with_name("missing.json"))


def test_an_api_key_is_kept_as_a_digest_bound_to_its_role_and_replaced_or_revoked_by_name(accounts: Path) -> None:
    first = issue_key(accounts, "lab-system", "clinician")
    assert first not in accounts.read_text()
    holder = Accounts.load(accounts).holder_of(first)
    assert holder is not None and (holder.name, holder.role) == ("lab-system", "clinician")
    second = issue_key(accounts, "lab-system", "operator")
    loaded = Accounts.load(accounts)
    assert loaded.holder_of(first) is None and loaded.holder_of(second).role == "operator"  # type: ignore[union-attr]
    revoke_key(accounts, "lab-system")
    assert Accounts.load(accounts).holder_of(second) is None
    with pytest.raises(CredentialError, match="no API key named"):
        revoke_key(accounts, "lab-system")


def test_a_session_ends_after_the_idle_time_and_only_the_users_doing_restarts_it(
        gate: tuple[TestClient, Clock, Path]) -> None:
    client, clock, _ = gate
    log_in(client, "cleo")
    assert client.get("/config").json() == {"user": "cleo"}
    clock.now += IDLE_S - 1
    assert event(client, 2) == 200  # the page refreshing itself: keeps nothing alive
    clock.now += 1
    assert client.get("/config").status_code == 401
    log_in(client, "cleo")
    clock.now += IDLE_S - 1
    assert event(client, 0) == 200  # the user's click: the idle time starts again
    clock.now += IDLE_S - 1
    assert client.get("/config").status_code == 200
    assert client.get("/", follow_redirects=False).status_code == 200
    clock.now += IDLE_S
    answer = client.get("/", follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/login")


def test_logout_ends_the_session_on_the_server(gate: tuple[TestClient, Clock, Path]) -> None:
    client, _, _ = gate
    log_in(client, "ada")
    session = client.cookies[SESSION_COOKIE]
    answer = client.post("/logout", follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (303, "/login")
    assert "Max-Age=0" in answer.headers["set-cookie"]
    client.cookies.set(SESSION_COOKIE, session)  # the cookie replayed
    assert client.get("/config").status_code == 401


def test_a_removed_user_is_out_at_once_and_a_changed_role_applies_at_once(
        gate: tuple[TestClient, Clock, Path]) -> None:
    client, _, accounts = gate
    log_in(client, "ada")
    assert event(client, 1) == 200
    set_user(accounts, "ada", "clinician", PASSWORD)
    assert event(client, 1) == 403 and event(client, 0) == 200
    remove_user(accounts, "ada")
    assert client.get("/config").status_code == 401
    set_user(accounts, "ada", "admin", PASSWORD)
    assert client.get("/config").status_code == 401  # the old session stays ended


def test_the_api_takes_keys_not_sessions_and_the_ui_sessions_not_keys(gate: tuple[TestClient, Clock, Path]) -> None:
    client, _, accounts = gate
    key = issue_key(accounts, "lab-system", "clinician")
    assert client.get("/api/v1/model", headers={"X-API-Key": key}).status_code == 200
    assert client.get("/api/v1/model", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert client.get("/config", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    log_in(client, "ada")
    assert client.get("/api/v1/model").status_code == 401


def test_a_login_body_past_its_limit_or_unparsable_is_a_refused_login(gate: tuple[TestClient, Clock, Path]) -> None:
    client, _, _ = gate
    padded = client.post("/login", content=b"username=ada&password=" + PASSWORD.encode() + b"&x=" + b"a" * 5000,
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert padded.status_code == 401 and SESSION_COOKIE not in padded.cookies
    assert client.post("/login", content=b"\xff\xfe", follow_redirects=False).status_code == 401
    page = client.get("/login")
    assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_a_websocket_is_refused_before_the_app(gate: tuple[TestClient, Clock, Path]) -> None:
    client, _, _ = gate
    with pytest.raises(Exception), client.websocket_connect("/gradio_api/queue/data"):  # noqa: B017, PT011
        pass


def test_sessions_are_bounded_the_least_recently_active_ended_first() -> None:
    clock = Clock()
    store = SessionStore(IDLE_S, max_sessions=2, clock=clock)
    first, second = store.open("a", "clinician"), store.open("b", "clinician")
    store.find(first, activity=True)
    third = store.open("c", "clinician")
    assert [store.find(t, activity=False) is not None for t in (first, second, third)] == [True, False, True]


def test_uploads_past_a_users_hourly_quota_are_refused_until_the_hour_is_over(
        gate: tuple[TestClient, Clock, Path]) -> None:
    client, clock, _ = gate
    log_in(client, "cleo")

    def upload(size: int, *, declared: bool = True) -> int:
        body = b"x" * size
        if declared:
            return client.post("/gradio_api/upload", content=body).status_code
        return client.post("/gradio_api/upload", content=iter([body])).status_code  # chunked: no length said

    assert upload(600) == 200
    assert upload(600) == 429  # said up front: it would go past the quota
    assert upload(300, declared=False) == 200
    assert upload(300, declared=False) == 200  # no length said: counted as it comes, past the quota by this one
    refused = client.post("/gradio_api/upload", content=b"x")
    assert refused.status_code == 429 and "cleo has uploaded" in refused.text
    assert refused.headers["retry-after"] == "3600"
    log_in(client, "ada")
    assert upload(600) == 200  # each user's own quota
    clock.now += 3600
    log_in(client, "cleo")  # (the session before ended with the idle time)
    assert upload(600) == 200
