"""The edge's ASGI wrappers on their own: limits, a stalled body, a client that goes away (the real processes are
tried in tests/integration/test_edge.py)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from health_mlops.web.edge import BlockedPaths, BodyLimit


async def echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = await Request(scope, receive).body()
    await JSONResponse({"length": len(body)})(scope, receive, send)


def call(app: Any, messages: list[dict[str, Any]], *, headers: list[tuple[bytes, bytes]] | None = None,
         path: str = "/api") -> list[dict[str, Any]]:
    """The messages `app` sends for a POST whose body arrives as `messages` (then nothing, ever)."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that stalls
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [], "client": ("10.0.0.7", 5000),
             "query_string": b""}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=10))
    return sent


def status(sent: list[dict[str, Any]]) -> int:
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def part(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


def test_a_body_within_the_limit_reaches_the_application() -> None:
    assert status(call(BodyLimit(echo_length, lambda _: 10), [part(b"12345"), part(b"67890", more=False)])) == 200


def test_a_declared_or_streamed_excess_is_refused_with_413() -> None:
    limited = BodyLimit(echo_length, lambda _: 10)
    assert status(call(limited, [], headers=[(b"content-length", b"11")])) == 413  # nothing read
    assert status(call(limited, [], headers=[(b"content-length", b"-1")])) == 413  # not a length
    streamed = call(limited, [part(b"123456"), part(b"789012"), part(b"x", more=False)])
    assert [status(streamed)] == [m["status"] for m in streamed if m["type"] == "http.response.start"] == [413]


def test_a_stalled_body_gets_408() -> None:
    assert status(call(BodyLimit(echo_length, lambda _: 100, body_timeout_s=0.05), [part(b"12345")])) == 408


def test_a_client_that_goes_away_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="health_mlops.http"):
        sent = call(BodyLimit(echo_length, lambda _: 100), [part(b"123"), {"type": "http.disconnect"}])
    assert sent == []
    assert [r.levelname for r in caplog.records] == ["INFO"] and "went away" in caplog.records[0].getMessage()


def test_blocked_paths_never_reach_the_application() -> None:
    blocked = BlockedPaths(BodyLimit(echo_length, lambda _: 100), ("/gradio_api/proxy=",))
    assert status(call(blocked, [part(b"", more=False)], path="/gradio_api/proxy=http://x")) == 404
    assert status(call(blocked, [part(b"", more=False)], path="/gradio_api/upload")) == 200
