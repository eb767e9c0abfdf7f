"""Who may call what on the dashboard, as tables: every route of the dashboard process (its REST API, all of
Gradio's, found by walking the app, and the session gate's login and logout) against every kind of caller, and
every Gradio function against every role, over real loopback HTTP. A route or a function without a row fails the
test. Health checks, metrics and the API's description answer anyone; `/api/v1` answers only a role-bound key;
everything else only a logged-in session; Gradio's routes the dashboard does not use are blocked at the edge
(404)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from health_mlops.config import get_settings
from health_mlops.serving.access_edge import SESSION_COOKIE, SessionGate
from health_mlops.serving.app import BLOCKED_GRADIO_PATHS, create_dashboard_app
from health_mlops.spec import load_spec
from health_mlops.trust.access import issue_key, set_user
from health_mlops.web.server import BackgroundServer

# One dashboard for the module (`dashboard`): its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("dashboard-authorization")

PASSWORD = "a long enough passphrase"
USERS = {"clinician": "cleo", "operator": "otto", "admin": "ada"}  # role -> the user who has it
SESSIONS = tuple(USERS)  # callers logged in with each role
KEYS = tuple(f"{role} key" for role in USERS)  # callers presenting an API key bound to each role
ANONYMOUS = ("no credential", "wrong key", "forged session")
CALLERS = (*ANONYMOUS, *KEYS, *SESSIONS)
# Values for the path parameters: a file outside the allowed folders, an outside URL for the proxy.
PATH_VALUES = {"path:path": "index.js", "size": "192", "key": "x", "id": "x", "environment": "x", "type": "x",
               "file_name": "x", "url_path:path": "http://127.0.0.1:9/", "path_or_url:path": "/etc/passwd",
               "event_id": "x", "session_hash": "x", "run": "0", "component_id": "0", "segment_id": "0",
               "ext": "ts", "api_name": "promote", "endpoint": "x", "record_id": "x", "asset_id": "x",
               "file": "swagger-ui-bundle.js"}


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    expected: dict[str, int]


def everyone(status: int) -> dict[str, int]:
    return dict.fromkeys(CALLERS, status)


def needs_key(status: int) -> dict[str, int]:
    """/api/v1: a key of any role (its routes are a clinician's); a session is not a key."""
    return {caller: status if caller in KEYS else 401 for caller in CALLERS}


def needs_session(status: int, *, otherwise: int = 401) -> dict[str, int]:
    """The UI and Gradio's API: a logged-in session of any role; a key is not a session."""
    return {caller: status if caller in SESSIONS else otherwise for caller in CALLERS}


TABLE = [
    Row("GET", "/openapi.json", everyone(200)),
    Row("GET", "/docs", everyone(200)),
    Row("GET", "/docs/oauth2-redirect", everyone(200)),
    Row("GET", "/static-offline-docs/{file}", everyone(200)),  # /docs' Swagger UI, served here: no CDN
    Row("POST", "/api/v1/predict", needs_key(422)),  # past the key: {} is not a patient
    Row("POST", "/api/v1/predict/batch", needs_key(422)),
    Row("POST", "/api/v1/noop", needs_key(200)),
    Row("GET", "/api/v1/model", needs_key(200)),
    Row("GET", "/healthz", everyone(200)),
    Row("GET", "/readyz", everyone(200)),
    Row("GET", "/metrics", everyone(200)),
    Row("GET", "/login", everyone(200)),  # the form
    Row("POST", "/login", everyone(401)),  # {} is no name and password
    Row("GET", "/logout", everyone(405)),  # logging out is a POST
    Row("POST", "/logout", everyone(303)),
    Row("POST", "/login/", everyone(404)),  # Gradio's own login
    Row("GET", "/svelte/{path:path}", needs_session(404)),
    Row("GET", "/", needs_session(200, otherwise=303)),  # to the login page
    Row("GET", "/gradio_api/deep_link", needs_session(422)),
    Row("GET", "/config", needs_session(200)),
    Row("GET", "/config/", needs_session(200)),
    Row("GET", "/static/{path:path}", needs_session(404)),
    Row("GET", "/assets/{path:path}", needs_session(404)),
    Row("GET", "/favicon.ico", needs_session(200)),
    Row("GET", "/theme.css", needs_session(200)),
    Row("GET", "/robots.txt", needs_session(200)),
    Row("GET", "/pwa_icon/{size}", needs_session(404)),
    Row("GET", "/pwa_icon", needs_session(404)),
    Row("GET", "/manifest.json", needs_session(200)),
    Row("GET", "/monitoring", everyone(404)),
    Row("GET", "/monitoring/summary", everyone(404)),
    Row("GET", "/monitoring/{key}", everyone(404)),
    Row("GET", "/gradio_api/user/", needs_session(200)),
    Row("GET", "/gradio_api/user", needs_session(200)),
    Row("GET", "/gradio_api/login_check/", needs_session(200)),
    Row("GET", "/gradio_api/login_check", needs_session(200)),
    Row("GET", "/gradio_api/token/", needs_session(200)),
    Row("GET", "/gradio_api/token", needs_session(200)),
    Row("GET", "/gradio_api/app_id/", needs_session(200)),
    Row("GET", "/gradio_api/app_id", needs_session(200)),
    Row("GET", "/gradio_api/dev/reload", everyone(404)),
    Row("GET", "/gradio_api/runs/", everyone(404)),
    Row("GET", "/gradio_api/runs", everyone(404)),
    Row("POST", "/gradio_api/run-history/connect", everyone(404)),
    Row("GET", "/gradio_api/run-history/buckets", everyone(404)),
    Row("GET", "/gradio_api/run-history/records", everyone(404)),
    Row("GET", "/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}", everyone(404)),
    Row("GET", "/gradio_api/info", needs_session(200)),
    Row("GET", "/gradio_api/info/", needs_session(200)),
    Row("GET", "/gradio_api/openapi.json", needs_session(200)),
    Row("GET", "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}", everyone(404)),
    Row("GET", "/gradio_api/proxy={url_path:path}", everyone(404)),
    Row("GET", "/gradio_api/file={path_or_url:path}", needs_session(403)),
    Row("POST", "/gradio_api/stream/{event_id}", everyone(404)),
    Row("POST", "/gradio_api/stream/{event_id}/close", everyone(404)),
    Row("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8", everyone(404)),
    Row("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}", everyone(404)),
    Row("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file", everyone(404)),
    Row("GET", "/gradio_api/file/{path:path}", needs_session(403)),
    Row("POST", "/gradio_api/reset", needs_session(422)),
    Row("POST", "/gradio_api/reset/", needs_session(422)),
    Row("GET", "/gradio_api/heartbeat/{session_hash}", needs_session(200)),
    Row("POST", "/gradio_api/api/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/api/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/run/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/run/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/call/v2/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/call/v2/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/call/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/call/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/queue/join", needs_session(403)),  # {} names no function of the dashboard
    Row("POST", "/gradio_api/cancel", needs_session(422)),
    Row("GET", "/gradio_api/call/{api_name}/{event_id}", everyone(404)),
    Row("GET", "/gradio_api/call/v2/{api_name}/{event_id}", everyone(404)),
    Row("GET", "/gradio_api/queue/data", needs_session(422)),
    Row("POST", "/gradio_api/component_server/", everyone(404)),
    Row("POST", "/gradio_api/component_server", everyone(404)),
    Row("GET", "/gradio_api/queue/status", needs_session(200)),
    Row("GET", "/gradio_api/upload_progress", needs_session(422)),
    Row("POST", "/gradio_api/upload", needs_session(400)),
    Row("GET", "/gradio_api/startup-events", needs_session(200)),
    Row("GET", "/gradio_api/theme.css", needs_session(200)),
    Row("POST", "/gradio_api/process_recording", everyone(404)),
    Row("POST", "/gradio_api/vibe-edit", everyone(404)),
    Row("POST", "/gradio_api/vibe-edit/", everyone(404)),
    Row("POST", "/gradio_api/undo-vibe-edit", everyone(404)),
    Row("POST", "/gradio_api/undo-vibe-edit/", everyone(404)),
    Row("GET", "/gradio_api/vibe-code", everyone(404)),
    Row("GET", "/gradio_api/vibe-code/", everyone(404)),
    Row("POST", "/gradio_api/vibe-code", everyone(404)),
    Row("POST", "/gradio_api/vibe-code/", everyone(404)),
    Row("POST", "/gradio_api/vibe-starter-queries", everyone(404)),
    Row("POST", "/gradio_api/vibe-starter-queries/", everyone(404)),
]


def routes(routes_: list, prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes_:
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            yield "GET", f"{prefix}{route.path}/{{file}}"
        elif isinstance(route, Mount):
            yield from routes(route.app.routes, prefix + route.path)
        elif hasattr(route, "path"):
            yield from ((m, prefix + route.path) for m in sorted(getattr(route, "methods", None) or ["GET"])
                        if m != "HEAD")
        else:  # a router FastAPI included with a prefix
            yield from routes(route.original_router.routes, prefix + route.include_context.prefix)


@dataclass(frozen=True)
class Served:
    url: str
    routes: set[tuple[str, str]]  # every (method, path) the dashboard process answers
    callers: dict[str, dict[str, str]]  # caller -> the headers it presents
    home: Path


def log_in(url: str, user: str, *, source: str = "127.0.0.1") -> dict[str, str]:
    """The headers of a browser logged in as `user` (connecting from `source`, an address of the loopback)."""
    with httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=source)) as client:
        answer = client.post("/login", data={"username": user, "password": PASSWORD})
    assert answer.status_code == 303, answer.text
    return {"Cookie": f"{SESSION_COOKIE}={answer.cookies[SESSION_COOKIE]}"}


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("dashboard-matrix") / "home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HEALTH_MLOPS_HOME", str(home))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("GRADIO_TEMP_DIR", str(home / "unused"))  # restored afterwards; the app points it elsewhere
        settings = get_settings()
        keys = {}
        for role, user in USERS.items():
            set_user(settings.dashboard_accounts, user, role, PASSWORD)  # type: ignore[arg-type]
            keys[f"{role} key"] = {"Authorization": f"Bearer {issue_key(settings.dashboard_accounts, role, role)}"}
        app = create_dashboard_app(settings, load_spec("health-risk"), poll_s=1.0)
        served = set(routes(app.routes)) | set(SessionGate.ROUTES)
        with BackgroundServer(app) as server:
            callers = {"no credential": {}, "wrong key": {"X-API-Key": "guessed"},
                       "forged session": {"Cookie": f"{SESSION_COOKIE}=guessed"}, **keys,
                       **{role: log_in(server.url, user) for role, user in USERS.items()}}
            yield Served(server.url, served, callers, home)


def test_every_route_has_a_row_and_blocked_routes_answer_404() -> None:
    assert len({(r.method, r.path) for r in TABLE}) == len(TABLE)
    for row in TABLE:
        if row.path.startswith(BLOCKED_GRADIO_PATHS):
            assert row.expected == everyone(404), row


def test_the_table_covers_the_dashboards_routes(dashboard: Served) -> None:
    assert dashboard.routes == {(r.method, r.path) for r in TABLE}


@pytest.mark.parametrize("row", TABLE, ids=lambda r: f"{r.method} {r.path}")
def test_the_dashboard_answers_each_caller_as_the_table_says(dashboard: Served, row: Row) -> None:
    path = re.sub(r"\{([^}]+)\}", lambda m: PATH_VALUES[m.group(1)], row.path)
    callers = dashboard.callers
    if row.path == "/logout":  # logging out ends the session: these sessions are the row's own
        callers = {**callers, **{role: log_in(dashboard.url, user) for role, user in USERS.items()}}
    answered = {}
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        for caller, headers in callers.items():
            body = {"json": {}} if row.method == "POST" else {}
            with client.stream(row.method, path, headers=headers, **body) as response:  # some routes stream
                answered[caller] = response.status_code
    assert answered == row.expected


# Who may run each function of the dashboard's page (by its API name, without Gradio's _1, _2 for repeats).
MAY_RUN = {
    "clinician": {"view", "template", "predict", "batch"},
    "operator": {"view", "template", "predict", "batch", "federation", "monitoring", "registered", "champion_report",
                 "compare", "opened"},
    "admin": {"view", "template", "predict", "batch", "federation", "monitoring", "registered", "champion_report",
              "compare", "opened", "promote", "rollback"},
}


def join(client: httpx.Client, headers: dict[str, str], body: object) -> int:
    return client.post("/gradio_api/queue/join", headers=headers, json=body).status_code


def test_each_gradio_function_runs_for_the_roles_that_may_run_it_and_for_no_other_caller(dashboard: Served) -> None:
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        config = client.get("/config", headers=dashboard.callers["admin"]).raise_for_status().json()
        names = set()
        for dependency in config["dependencies"]:
            name = re.sub(r"_\d+$", "", dependency["api_name"])
            names.add(name)
            # No inputs: a function that may run is queued (200) and then fails on its missing inputs, changing
            # nothing (promote and rollback included).
            body = {"data": [], "fn_index": dependency["id"], "session_hash": "matrix", "trigger_id": None}
            answered = {caller: join(client, headers, body) for caller, headers in dashboard.callers.items()}
            expected = {caller: (200 if name in MAY_RUN[caller] else 403) if caller in SESSIONS else 401
                        for caller in CALLERS}
            assert answered == expected, name
    assert names == set().union(*MAY_RUN.values())


def test_an_operators_tabs_load_once_when_the_page_opens(dashboard: Served) -> None:
    """The one-shot tick that opens the page runs only what stops its timer, and the tabs load after it: a tick
    that also loaded them let a second tick through on a busy machine, and its late answer reset a version the
    user had just picked to compare."""
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        config = client.get("/config", headers=dashboard.callers["admin"]).raise_for_status().json()
    dependencies = config["dependencies"]
    [opening] = [d for d in dependencies if d["api_name"] == "opened"]
    [(timer, _)] = opening["targets"]
    on_tick = [d["api_name"] for d in dependencies if [timer, "tick"] in d["targets"]]
    assert on_tick == ["opened"]
    assert opening["trigger_mode"] == "once"
    loaded_after = {re.sub(r"_\d+$", "", d["api_name"]) for d in dependencies if d["trigger_after"] == opening["id"]}
    assert loaded_after == {"federation", "monitoring", "registered", "champion_report"}


@pytest.mark.parametrize("body", [{"data": [], "fn_index": 999}, {"data": [], "fn_index": "4"},
                                  {"data": [], "fn_index": True}, {"data": []}, [4], "not an object"],
                         ids=["unknown index", "index as text", "index as boolean", "no index", "a list", "a string"])
def test_an_event_naming_no_function_of_the_dashboard_is_refused(dashboard: Served, body: object) -> None:
    with httpx.Client(base_url=dashboard.url, timeout=30) as client:
        assert join(client, dashboard.callers["admin"], body) == 403


def audited_logins(home: Path, source: str) -> list[tuple[str, str]]:
    lines = [json.loads(line) for line in (home / "audit.log").read_text().splitlines()]
    return [(line["actor"], line["outcome"]) for line in lines
            if line["action"] == "dashboard login" and line.get("source") == source]


def test_a_wrong_password_and_an_unknown_name_get_the_same_answer_and_are_audited(dashboard: Served) -> None:
    source = "127.0.0.2"  # this test's own address: the throttle and the audit count per address
    with httpx.Client(base_url=dashboard.url, transport=httpx.HTTPTransport(local_address=source)) as client:
        wrong = client.post("/login", data={"username": "ada", "password": "not " + PASSWORD})
        unknown = client.post("/login", data={"username": "mallory", "password": PASSWORD})
    assert (wrong.status_code, unknown.status_code) == (401, 401)
    assert wrong.text == unknown.text and "do not match an account" in wrong.text  # no name is confirmed
    assert SESSION_COOKIE not in wrong.cookies and SESSION_COOKIE not in unknown.cookies
    assert audited_logins(dashboard.home, source) == [("ada", "refused"), ("mallory", "refused")]
    log_in(dashboard.url, "otto", source=source)
    assert audited_logins(dashboard.home, source)[-1] == ("otto", "ok")


def test_a_password_guesser_is_slowed_and_its_audit_lines_are_bounded(dashboard: Served) -> None:
    source = "127.0.0.3"
    exposed = httpx.get(f"{dashboard.url}/metrics").text
    refused_before = float(re.search(r'health_mlops_dashboard_logins_total\{outcome="refused"\} (\S+)',
                                     exposed).group(1))
    with httpx.Client(base_url=dashboard.url, transport=httpx.HTTPTransport(local_address=source)) as client:
        for guess in range(8):
            assert client.post("/login", data={"username": "ada", "password": f"guess {guess}"}).status_code == 401
    # The first five refusals from an address in a minute are audited; the rest only counted (a guesser cannot
    # flood the audit log), and answered each later than the one before.
    assert audited_logins(dashboard.home, source) == [("ada", "refused")] * 5
    exposed = httpx.get(f"{dashboard.url}/metrics").text
    assert f'health_mlops_dashboard_logins_total{{outcome="refused"}} {refused_before + 8}' in exposed


def gradio_event(url: str, function: str, data: list[object], headers: dict[str, str]) -> dict:
    """Call one of the dashboard's functions as the browser does (join the queue, read the event stream), with
    `data` as its inputs however the caller crafted them; the final message (`process_completed`)."""
    session = "attacker-session"
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        config = client.get("/config").raise_for_status().json()
        (index,) = [d["id"] for d in config["dependencies"] if d["api_name"] == function]
        joined = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": index,
                                                             "session_hash": session, "trigger_id": None,
                                                             "event_data": None})
        assert joined.status_code == 200, joined.text
        with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line.removeprefix("data:"))
                    if message.get("msg") == "process_completed":
                        return message
    raise AssertionError("the event stream ended without completing")


def test_an_event_cannot_make_the_dashboard_read_a_file_its_session_did_not_upload(
        dashboard: Served, tmp_path: Path) -> None:
    """The attack: the batch function handed a path on the dashboard's host instead of an upload (a hospital's
    data file; /etc/passwd) must read nothing, return nothing of it and copy nothing into the upload folder."""
    url, clinician = dashboard.url, dashboard.callers["clinician"]
    planted = tmp_path / "hospital-1" / "patient-days.csv"
    planted.parent.mkdir()
    planted.write_text("age,spo2,outcome\n71,88,1\n" + "45,97,0\n" * 599)
    uploads = Path(os.environ["GRADIO_TEMP_DIR"])  # where the dashboard stores uploads (create_dashboard_app)

    def stored() -> set[Path]:
        return {p for p in uploads.rglob("*") if p.is_file()}

    before = stored()
    for path in (planted, Path("/etc/passwd")):
        file_data = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        answer = gradio_event(url, "batch", [file_data], clinician)
        assert answer["success"] is False, answer
        assert "71,88" not in json.dumps(answer) and "root:" not in json.dumps(answer)
        assert stored() == before  # nothing copied in
    # The same event with this session's upload of the same file is read (no model is registered here to score it).
    with httpx.Client(base_url=url, timeout=60, headers=clinician) as client:
        (uploaded,) = client.post("/gradio_api/upload", files={"files": (planted.name, planted.read_bytes())}).json()
    file_data = {"path": uploaded, "orig_name": planted.name, "meta": {"_type": "gradio.FileData"}}
    answer = gradio_event(url, "batch", [file_data], clinician)
    assert answer["success"] is True and "The file cannot be used" in answer["output"]["data"][0], answer
