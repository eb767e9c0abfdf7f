"""Who may call what on the dashboard, as one table: every route of the dashboard process (its REST API and all
of Gradio's, found by walking the app) against a caller without the API key, with a wrong one and with the
right one, over real loopback HTTP. A route without a row fails the test. Gradio's routes take no credential
(the UI is public; its admin actions take the admin token inside the request, refused and audited otherwise);
the ones the dashboard does not use are blocked at the edge (404)."""

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
from health_mlops.http_server import BackgroundServer
from health_mlops.serving.app import BLOCKED_GRADIO_PATHS, create_dashboard_app
from health_mlops.spec import load_spec

# One dashboard for the module (`dashboard`): its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("dashboard-authorization")

API_KEY = "the-consortiums-api-key"
CALLERS = {"no key": {}, "wrong key": {"X-API-Key": "guessed"}, "API key": {"Authorization": f"Bearer {API_KEY}"}}
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
    return {"no key": 401, "wrong key": 401, "API key": status}


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
    Row("POST", "/login/", everyone(404)),
    Row("POST", "/login", everyone(404)),
    Row("GET", "/logout", everyone(404)),
    Row("GET", "/svelte/{path:path}", everyone(404)),
    Row("GET", "/", everyone(200)),
    Row("GET", "/gradio_api/deep_link", everyone(422)),
    Row("GET", "/config", everyone(200)),
    Row("GET", "/config/", everyone(200)),
    Row("GET", "/static/{path:path}", everyone(404)),
    Row("GET", "/assets/{path:path}", everyone(404)),
    Row("GET", "/favicon.ico", everyone(200)),
    Row("GET", "/theme.css", everyone(200)),
    Row("GET", "/robots.txt", everyone(200)),
    Row("GET", "/pwa_icon/{size}", everyone(404)),
    Row("GET", "/pwa_icon", everyone(404)),
    Row("GET", "/manifest.json", everyone(200)),
    Row("GET", "/monitoring", everyone(404)),
    Row("GET", "/monitoring/summary", everyone(404)),
    Row("GET", "/monitoring/{key}", everyone(404)),
    Row("GET", "/gradio_api/user/", everyone(200)),
    Row("GET", "/gradio_api/user", everyone(200)),
    Row("GET", "/gradio_api/login_check/", everyone(200)),
    Row("GET", "/gradio_api/login_check", everyone(200)),
    Row("GET", "/gradio_api/token/", everyone(200)),
    Row("GET", "/gradio_api/token", everyone(200)),
    Row("GET", "/gradio_api/app_id/", everyone(200)),
    Row("GET", "/gradio_api/app_id", everyone(200)),
    Row("GET", "/gradio_api/dev/reload", everyone(404)),
    Row("GET", "/gradio_api/runs/", everyone(404)),
    Row("GET", "/gradio_api/runs", everyone(404)),
    Row("POST", "/gradio_api/run-history/connect", everyone(404)),
    Row("GET", "/gradio_api/run-history/buckets", everyone(404)),
    Row("GET", "/gradio_api/run-history/records", everyone(404)),
    Row("GET", "/gradio_api/run-history/records/{endpoint}/{record_id}/assets/{asset_id}", everyone(404)),
    Row("GET", "/gradio_api/info", everyone(200)),
    Row("GET", "/gradio_api/info/", everyone(200)),
    Row("GET", "/gradio_api/openapi.json", everyone(200)),
    Row("GET", "/gradio_api/custom_component/{id}/{environment}/{type}/{file_name}", everyone(404)),
    Row("GET", "/gradio_api/proxy={url_path:path}", everyone(404)),
    Row("GET", "/gradio_api/file={path_or_url:path}", everyone(403)),
    Row("POST", "/gradio_api/stream/{event_id}", everyone(404)),
    Row("POST", "/gradio_api/stream/{event_id}/close", everyone(404)),
    Row("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist.m3u8", everyone(404)),
    Row("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/{segment_id}.{ext}", everyone(404)),
    Row("GET", "/gradio_api/stream/{session_hash}/{run}/{component_id}/playlist-file", everyone(404)),
    Row("GET", "/gradio_api/file/{path:path}", everyone(403)),
    Row("POST", "/gradio_api/reset", everyone(422)),
    Row("POST", "/gradio_api/reset/", everyone(422)),
    Row("GET", "/gradio_api/heartbeat/{session_hash}", everyone(200)),
    Row("POST", "/gradio_api/api/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/api/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/run/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/run/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/call/v2/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/call/v2/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/call/{api_name}/", everyone(404)),
    Row("POST", "/gradio_api/call/{api_name}", everyone(404)),
    Row("POST", "/gradio_api/queue/join", everyone(422)),
    Row("POST", "/gradio_api/cancel", everyone(422)),
    Row("GET", "/gradio_api/call/{api_name}/{event_id}", everyone(404)),
    Row("GET", "/gradio_api/call/v2/{api_name}/{event_id}", everyone(404)),
    Row("GET", "/gradio_api/queue/data", everyone(422)),
    Row("POST", "/gradio_api/component_server/", everyone(400)),
    Row("POST", "/gradio_api/component_server", everyone(400)),
    Row("GET", "/gradio_api/queue/status", everyone(200)),
    Row("GET", "/gradio_api/upload_progress", everyone(422)),
    Row("POST", "/gradio_api/upload", everyone(400)),
    Row("GET", "/gradio_api/startup-events", everyone(200)),
    Row("GET", "/gradio_api/theme.css", everyone(200)),
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


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, set[tuple[str, str]]]]:
    home = tmp_path_factory.mktemp("dashboard-matrix") / "home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HEALTH_MLOPS_HOME", str(home))
        env.setenv("HEALTH_MLOPS_API_KEY", API_KEY)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("GRADIO_TEMP_DIR", str(home / "unused"))  # restored afterwards; the app points it elsewhere
        app = create_dashboard_app(get_settings(), load_spec("health-risk"), poll_s=1.0)
        served = {route for route in routes(app.app.app.routes)}  # inside the edge's two wrappers
        with BackgroundServer(app) as server:
            yield server.url, served


def test_every_route_has_a_row_and_blocked_routes_answer_404() -> None:
    assert len({(r.method, r.path) for r in TABLE}) == len(TABLE)
    for row in TABLE:
        if row.path.startswith(BLOCKED_GRADIO_PATHS):
            assert row.expected == everyone(404), row


def test_the_table_covers_the_dashboards_routes(dashboard: tuple[str, set[tuple[str, str]]]) -> None:
    _, served = dashboard
    assert served == {(r.method, r.path) for r in TABLE}


@pytest.mark.parametrize("row", TABLE, ids=lambda r: f"{r.method} {r.path}")
def test_the_dashboard_answers_each_caller_as_the_table_says(dashboard: tuple[str, set[tuple[str, str]]],
                                                             row: Row) -> None:
    url, _ = dashboard
    path = re.sub(r"\{([^}]+)\}", lambda m: PATH_VALUES[m.group(1)], row.path)
    answered = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for caller, headers in CALLERS.items():
            body = {"json": {}} if row.method == "POST" else {}
            with client.stream(row.method, path, headers=headers, **body) as response:  # some routes stream
                answered[caller] = response.status_code
    assert answered == row.expected


def gradio_event(url: str, function: str, data: list[object]) -> dict:
    """Call one of the dashboard's functions as the browser does (join the queue, read the event stream), with
    `data` as its inputs however the caller crafted them; the final message (`process_completed`)."""
    session = "attacker-session"
    with httpx.Client(base_url=url, timeout=60) as client:
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
        dashboard: tuple[str, set[tuple[str, str]]], tmp_path: Path) -> None:
    """The attack: the batch function handed a path on the dashboard's host instead of an upload (a hospital's
    data file; /etc/passwd) must read nothing, return nothing of it and copy nothing into the upload folder."""
    url, _ = dashboard
    planted = tmp_path / "hospital-1" / "patient-days.csv"
    planted.parent.mkdir()
    planted.write_text("age,spo2,outcome\n71,88,1\n" + "45,97,0\n" * 599)
    uploads = Path(os.environ["GRADIO_TEMP_DIR"])  # where the dashboard stores uploads (create_dashboard_app)

    def stored() -> set[Path]:
        return {p for p in uploads.rglob("*") if p.is_file()}

    before = stored()
    for path in (planted, Path("/etc/passwd")):
        file_data = {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}
        answer = gradio_event(url, "batch", [file_data])
        assert answer["success"] is False, answer
        assert "71,88" not in json.dumps(answer) and "root:" not in json.dumps(answer)
        assert stored() == before  # nothing copied in
    # The same event with this session's upload of the same file is read (no model is registered here to score it).
    with httpx.Client(base_url=url, timeout=60) as client:
        (uploaded,) = client.post("/gradio_api/upload", files={"files": (planted.name, planted.read_bytes())}).json()
    file_data = {"path": uploaded, "orig_name": planted.name, "meta": {"_type": "gradio.FileData"}}
    answer = gradio_event(url, "batch", [file_data])
    assert answer["success"] is True and "The file cannot be used" in answer["output"]["data"][0], answer
