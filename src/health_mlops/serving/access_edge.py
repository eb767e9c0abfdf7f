"""The dashboard's door: nothing but health checks, metrics, the API's description and the login page is answered
to a caller who has not shown who they are, and each caller gets only what their role allows (`trust/access.py`).

- `/api/v1/*` takes a bearer key (`Authorization: Bearer <key>` or `X-API-Key: <key>`) bound to a role; 401 else.
- Everything else (the Gradio UI and its API) takes a session cookie from `/login`; without one, the page redirects
  to the login form and every other route answers 401. A Gradio event (`/gradio_api/queue/join`, the only route
  that runs a dashboard function: the programmatic call routes are blocked) runs only if the session's role may
  run that function (`FunctionRule`), else 403.
- Uploads are counted per user: past `UPLOAD_QUOTA_BYTES` in an hour, the next is refused (429).
- Logins are throttled per client address and audited (the first few refusals per address and minute, then only
  counted); logout ends the session on the server.

A session ends after `idle_s` without something the user did: a page load, an upload or an event they triggered.
The page's own periodic refreshes (timers, loads) keep nothing alive.
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from anyio import to_thread

from health_mlops.monitoring import ServingMetrics
from health_mlops.trust.access import Accounts, Role, Session, SessionStore, allows
from health_mlops.trust.audit import AuditLog
from health_mlops.trust.credentials import FailureThrottle
from health_mlops.web.edge import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "health_mlops_session"
USER_SCOPE_KEY = "health_mlops.user"  # the logged-in user's name, for Gradio's `auth_dependency`
LOGIN_PATH, LOGOUT_PATH, QUEUE_JOIN_PATH = "/login", "/logout", "/gradio_api/queue/join"
UPLOAD_PATH = "/gradio_api/upload"
# What one user may upload in an hour (Gradio keeps an upload for an hour): four of the largest batches. It bounds
# the disk one account can fill; one request is bounded by the edge's body limit.
UPLOAD_QUOTA_BYTES = 256 * 1024 * 1024
UPLOAD_WINDOW_S = 3600.0
MAX_LOGIN_BYTES = 4096
# Answered to anyone: probes, Prometheus, the API's description and its docs page (no patient data, no model).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect"})
PUBLIC_PREFIXES = ("/static-offline-docs/",)
API_PREFIX = "/api/v1/"
API_ROLE: Role = "clinician"  # every /api/v1 route: predictions and the model's description
# What counts as the user doing something (restarts the idle time): the page itself and uploads.
ACTIVITY_PATHS = frozenset({"/", UPLOAD_PATH})
# One argon2id check takes 64 MiB and tens of milliseconds of a CPU: a flood of logins queues here instead of
# taking the replica's memory.
CONCURRENT_PASSWORD_CHECKS = 2


class UploadQuota:
    """Bytes uploaded per user in fixed windows of `window_s`; an upload is refused once the user's window is full
    (one in flight may take it past the limit by at most the edge's body limit)."""

    def __init__(self, limit_bytes: int = UPLOAD_QUOTA_BYTES, *, window_s: float = UPLOAD_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_bytes, self.window_s, self.clock = limit_bytes, window_s, clock
        self._used: dict[str, tuple[float, int]] = {}  # user -> (window start, bytes)

    def allows(self, user: str, declared: int = 0) -> bool:
        """Whether `user` may start an upload of `declared` bytes now."""
        return self._current(user) + declared <= self.limit_bytes

    def charge(self, user: str, size: int) -> None:
        used = self._current(user)  # first: a window past its end starts again
        started, _ = self._used.get(user, (self.clock(), 0))
        self._used[user] = (started, used + size)

    def _current(self, user: str) -> int:
        started, used = self._used.get(user, (self.clock(), 0))
        if self.clock() - started >= self.window_s:
            self._used.pop(user, None)
            return 0
        return used


@dataclass(frozen=True)
class FunctionRule:
    """Who may run one Gradio function, and whether running it is the user's doing (a click, an upload) rather
    than the page's own (a load, a timer): only the user's doing keeps a session alive."""

    role: Role
    user_action: bool


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope["headers"]}


def _cookie(scope: Scope) -> str | None:
    raw = _headers(scope).get(b"cookie")
    if not raw:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(raw.decode("latin-1"))
    except Exception:  # noqa: BLE001 - an unparsable cookie header is no session
        return None
    morsel = cookies.get(SESSION_COOKIE)
    return morsel.value if morsel else None


def _presented_key(scope: Scope) -> str:
    headers = _headers(scope)
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else headers.get(b"x-api-key", b"").decode("latin-1")


async def _answer(send: Send, status: int, body: bytes, content_type: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _answer(send, status, json.dumps({"detail": detail}).encode(), "application/json", headers)


def _redirect(location: str, cookie: str | None = None) -> tuple[int, list[tuple[bytes, bytes]]]:
    headers = [(b"location", location.encode())]
    if cookie is not None:
        headers.append((b"set-cookie", cookie.encode()))
    return 303, headers


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Health MLOps: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:4rem auto;padding:0 1rem}}
label{{display:block;margin-top:1rem}}input{{width:100%;padding:.4rem;box-sizing:border-box}}
button{{margin-top:1.2rem;padding:.5rem 1.2rem}}.error{{color:#b00020}}</style></head>
<body><h1>Health MLOps</h1>{message}
<form method="post" action="/login">
<label>Name <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>
"""
# The login page runs no script and loads nothing; it may not be framed (clickjacking) nor post elsewhere.
PAGE_HEADERS = [(b"content-security-policy",
                 b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
                (b"x-frame-options", b"DENY")]


class SessionGate:
    """The ASGI layer that authenticates every request and authorises it by role (see the module's text)."""

    # The routes the gate answers itself (beside the app's), for the authorization matrix; GET /logout (Gradio's
    # own) is answered 405.
    ROUTES = (("GET", LOGIN_PATH), ("POST", LOGIN_PATH), ("GET", LOGOUT_PATH), ("POST", LOGOUT_PATH))

    def __init__(self, app: ASGIApp, *, accounts: Callable[[], Accounts], sessions: SessionStore,
                 function_rules: Callable[[], dict[int, FunctionRule]], audit: AuditLog, metrics: ServingMetrics,
                 secure_cookie: bool, throttle: FailureThrottle | None = None,
                 uploads: UploadQuota | None = None) -> None:
        self.app, self.accounts, self.sessions = app, accounts, sessions
        self.function_rules, self.audit, self.metrics = function_rules, audit, metrics
        self.secure_cookie = secure_cookie
        self.throttle = throttle or FailureThrottle()
        self.uploads = uploads or UploadQuota()
        self._password_checks = asyncio.Semaphore(CONCURRENT_PASSWORD_CHECKS)

    def __getattr__(self, name: str) -> Any:  # the wrapped app's attributes (FastAPI's `state`, `routes`)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no route of the dashboard is a websocket: none is opened unauthenticated
            await send({"type": "websocket.close", "code": 1008})
            return
        path: str = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
        elif path == LOGIN_PATH:
            await self._login(scope, receive, send)
        elif path == LOGOUT_PATH:
            await self._logout(scope, send)
        elif path.startswith(API_PREFIX):
            await self._api(scope, receive, send)
        else:
            await self._ui(scope, receive, send)

    # --- API keys ---------------------------------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        holder = self.accounts().holder_of(_presented_key(scope))
        if holder is None:
            self.metrics.auth_failures.labels("401").inc()
            await _json(send, 401, "this API needs a key: Authorization: Bearer <key> or X-API-Key: <key>",
                        [(b"www-authenticate", b"Bearer")])
        elif not allows(holder.role, API_ROLE):
            self.metrics.auth_failures.labels("403").inc()
            await _json(send, 403, f"the key {holder.name!r} ({holder.role}) may not use this API")
        else:
            await self.app(scope, receive, send)

    # --- the UI -----------------------------------------------------------------------------------------

    def _session(self, scope: Scope, *, activity: bool) -> Session | None:
        """The request's live session, its role as the accounts file says now (a removed user's ends here)."""
        token = _cookie(scope)
        session = self.sessions.find(token, activity=activity)
        if session is None:
            return None
        role = self.accounts().role_of(session.user)
        if role is None:
            self.sessions.close(token)
            return None
        session.role = role
        return session

    async def _ui(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == QUEUE_JOIN_PATH and scope["method"] == "POST":
            await self._gradio_event(scope, receive, send)
            return
        session = self._session(scope, activity=path in ACTIVITY_PATHS)
        if session is None:
            await self._not_logged_in(scope, send)
            return
        scope[USER_SCOPE_KEY] = session.user
        if path == UPLOAD_PATH and scope["method"] == "POST":
            await self._upload(session.user, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _upload(self, user: str, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _headers(scope).get(b"content-length", b"0")
        if not self.uploads.allows(user, int(declared) if declared.isdigit() else 0):
            await _json(send, 429, f"{user} has uploaded {self.uploads.limit_bytes // (1024 * 1024)} MiB in the "
                                   "last hour, as much as an hour allows; try again later",
                        [(b"retry-after", str(int(self.uploads.window_s)).encode())])
            return

        async def counted() -> Message:
            message = await receive()
            self.uploads.charge(user, len(message.get("body", b"")))
            return message

        await self.app(scope, counted, send)

    async def _not_logged_in(self, scope: Scope, send: Send) -> None:
        if scope["method"] == "GET" and scope["path"] == "/":
            status, headers = _redirect(LOGIN_PATH)
            await _answer(send, status, b"", "text/plain", headers)
        else:
            await _json(send, 401, "log in first: this dashboard needs a session (POST /login)")

    async def _gradio_event(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Reads the event's body (bounded by the edge's body limit) to learn which function it runs, and passes
        the same bytes on if the session's role may run it."""
        body, messages = await _read_body(receive)
        rule = self.function_rules().get(_function_index(body))  # type: ignore[arg-type]
        session = self._session(scope, activity=rule is not None and rule.user_action)
        if session is None:
            await self._not_logged_in(scope, send)
            return
        if rule is None or not allows(session.role, rule.role):
            self.metrics.auth_failures.labels("403").inc()
            needed = f"the {rule.role} role" if rule else "a function this dashboard has"
            await _json(send, 403, f"{session.user} ({session.role}) may not run this: it needs {needed}")
            return
        scope[USER_SCOPE_KEY] = session.user
        replay = list(messages)

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)

    # --- login and logout -------------------------------------------------------------------------------

    def _cookie_header(self, value: str, max_age: int | None = None) -> str:
        cookie = f"{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"
        if max_age is not None:
            cookie += f"; Max-Age={max_age}"
        return cookie + ("; Secure" if self.secure_cookie else "")

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "GET":
            await self._login_page(send, 200, "")
            return
        if scope["method"] != "POST":
            await _json(send, 405, "GET the login page or POST the form")
            return
        body, _ = await _read_body(receive, limit=MAX_LOGIN_BYTES)
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4) if body is not None else {}
        user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
        source = (scope.get("client") or ("?", 0))[0]
        async with self._password_checks:
            role = await to_thread.run_sync(self.accounts().check_password, user, password)
        if role is None:
            self.metrics.logins.labels("refused").inc()
            self.metrics.auth_failures.labels("401").inc()
            delay = self.throttle.failed(source, "a wrong dashboard name or password")
            if delay == 0:  # the first refusals per address and window; beyond them, only counted
                await to_thread.run_sync(lambda: self.audit.append("dashboard login", user[:64] or "?",
                                                                   outcome="refused", source=source))
            await asyncio.sleep(delay)
            await self._login_page(send, 401, "That name and password do not match an account.")
            return
        token = self.sessions.open(user, role)
        self.metrics.logins.labels("ok").inc()
        self.metrics.sessions.set(len(self.sessions))
        await to_thread.run_sync(lambda: self.audit.append("dashboard login", user, role=role, source=source))
        status, headers = _redirect("/", self._cookie_header(token))
        await _answer(send, status, b"", "text/plain", headers)

    async def _login_page(self, send: Send, status: int, error: str) -> None:
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        await _answer(send, status, LOGIN_PAGE.format(message=message).encode(), "text/html; charset=utf-8",
                      PAGE_HEADERS)

    async def _logout(self, scope: Scope, send: Send) -> None:
        if scope["method"] != "POST":  # a link or an image elsewhere cannot log a user out
            await _json(send, 405, "POST to log out", [(b"allow", b"POST")])
            return
        session = self.sessions.close(_cookie(scope))
        self.metrics.sessions.set(len(self.sessions))
        if session is not None:
            await to_thread.run_sync(lambda: self.audit.append("dashboard logout", session.user))
        status, headers = _redirect(LOGIN_PATH, self._cookie_header("", max_age=0))
        await _answer(send, status, b"", "text/plain", headers)


async def _read_body(receive: Receive, *, limit: int | None = None) -> tuple[bytes | None, list[Message]]:
    """The request body and the messages it came in (to pass on unchanged); None as the body if the client went
    away or it is over `limit` bytes."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None, messages
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def _function_index(body: bytes | None) -> int | None:
    """The `fn_index` a Gradio event names, or None if the body does not name one as Gradio reads it."""
    try:
        index = json.loads(body) if body else None
    except ValueError:
        return None
    value = index.get("fn_index") if isinstance(index, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
